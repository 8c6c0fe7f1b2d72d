"""Data room: raw JSONL/JSON/Parquet -> Megatron indexed datasets -> the datasets the trainer reads.

Public API (see each module's docstring):

    preprocess.PreprocessConfig, preprocess.preprocess(cfg) -> summary dict, preprocess.main(argv)
    templates.DeepSeek3Template().render(messages, tools) -> [(text, loss), ...]
    handlers.get_handler(name, tokenizer, json_keys, ...)
    datasets.build_pretrain_datasets(...), datasets.SFTDataset, datasets.build_sft_dataloader(...)
"""
