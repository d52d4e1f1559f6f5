"""neox: pretraining LLaMA-family models with GPT-NeoX configs on DeepSpeed and Megatron-style TP."""

__version__ = "0.1.0"
