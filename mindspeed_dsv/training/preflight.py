"""`python -m mindspeed_dsv.training.preflight ENTRY [training flags]`: the trainer's checks that need no process
group (flags, config.json, tokenizer, datasets), in one process, before torchrun starts.

The example scripts run it first (examples/mcore/deepseek3/common.sh, dsv_train) so a bad flag or input is one
line `ENTRY: error: ...` with exit 2, instead of that line followed by torchrun's failure report. ENTRY is
pretrain_gpt.py or posttrain_gpt.py (the latter implies --is-instruction-dataset, as it does at launch); set
WORLD_SIZE to the run's world size. Prints nothing when the checks pass.
"""

import os
import sys

from mindspeed_dsv.training.arguments import entry_argv
from mindspeed_dsv.training.loop import main

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if len(sys.argv) >= 2 else 2)
    entry = os.path.basename(sys.argv[1])
    sys.exit(main(entry_argv(entry, sys.argv[2:]), prog=entry, check_only=True))
