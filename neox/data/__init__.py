"""Data pipeline: mmap indexed datasets (``indexed_dataset``), GPT samples (``gpt_dataset``), mixtures
and splits (``blendable``), the Megatron sampler (``samplers``), preprocessing (``preprocess``) and
``builder.build_data_iterators``. Submodules are imported explicitly; importing this package is free.
"""
