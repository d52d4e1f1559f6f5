"""The transformer: GPTModel (plain module) and GPTModelPipe (DeepSpeed pipeline form)."""

from neox.model.gpt import GPTModel
from neox.model.kv_cache import KVCache
from neox.model.loss import lm_loss

__all__ = ["GPTModel", "KVCache", "lm_loss"]
