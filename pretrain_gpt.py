"""MindSpeed-LLM's entry name for pretraining: the same trainer as `python -m mindspeed_dsv.train`."""

import sys

from mindspeed_dsv.training.loop import main

if __name__ == "__main__":
    sys.exit(main(prog="pretrain_gpt.py"))
