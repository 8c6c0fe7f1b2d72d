"""`python -m mindspeed_dsv.train` (under torchrun): pretrain or fine-tune. See `--help`."""

import sys

from mindspeed_dsv.training.loop import main

if __name__ == "__main__":
    sys.exit(main())
