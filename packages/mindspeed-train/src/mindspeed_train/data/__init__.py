"""Data preparation: ``mindspeed preprocess`` (pretraining and instruction data -> indexed datasets).

Modules: ``tokenizer`` (local HF tokenizers), ``readers`` (jsonl/json/parquet/text),
``pretrain`` and ``instruction`` (the two pipelines), ``handlers`` (alpaca / sharegpt),
``templates`` (prompt types), ``encode`` (loss masks), ``packing`` (pack / neat pack,
cu_seqlens), ``writer`` (megatron-core's builder, atomic rename), ``cli``.
"""
