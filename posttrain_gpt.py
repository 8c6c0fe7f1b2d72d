"""MindSpeed-LLM's entry name for fine-tuning (full, LoRA, QLoRA): the trainer with instruction data.

Identical to `python -m mindspeed_dsv.train --is-instruction-dataset ...`."""

import sys

from mindspeed_dsv.training.arguments import entry_argv
from mindspeed_dsv.training.loop import main

if __name__ == "__main__":
    sys.exit(main(entry_argv("posttrain_gpt.py", sys.argv[1:]), prog="posttrain_gpt.py"))
