"""HF DeepSeek-V3 <-> Megatron-Core checkpoint conversion: `python -m ckpt_convert <command> --help`.

Commands: hf2mcore, mcore2hf (with LoRA merge / PEFT export), reshard, verify. The HF <-> Megatron name map
lives in mindspeed_dsv/models/names.py and the layout object in mindspeed_dsv/layout.py.
"""
