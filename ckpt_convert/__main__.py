"""python -m ckpt_convert {hf2mcore,mcore2hf,reshard,verify} --help"""

import sys

from ckpt_convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
