"""MindSpeed-LLM's entry name for fine-tuning (full, LoRA, QLoRA): the trainer with instruction data.

Identical to `python -m mindspeed_dsv.train --is-instruction-dataset ...`."""

import sys

from mindspeed_dsv.training.loop import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--is-instruction-dataset" not in argv:
        argv = ["--is-instruction-dataset", *argv]
    sys.exit(main(argv, prog="posttrain_gpt.py"))
