"""``build_tokenizer(cfg)``: the tokenizer a ``TokenizerConfig`` names."""

from __future__ import annotations

from typing import TYPE_CHECKING

from neox.errors import ConfigError
from neox.tokenizer.base import CharLevelTokenizer, Tokenizer

if TYPE_CHECKING:
    from neox.config.data import TokenizerConfig

TOKENIZER_TYPES = ("SPMTokenizer", "HFTokenizer", "HFGPT2Tokenizer", "GPT2BPETokenizer", "CharLevelTokenizer")


def build_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    """Build from ``cfg.tokenizer_type``, ``cfg.vocab_file`` and ``cfg.merge_file`` (NeoX names)."""
    kind = cfg.tokenizer_type
    vocab_file = getattr(cfg, "vocab_file", None)
    if kind == "SPMTokenizer":
        from neox.tokenizer.sentencepiece import SPMTokenizer

        return SPMTokenizer(vocab_file)
    if kind in ("HFTokenizer", "HFGPT2Tokenizer"):
        from neox.tokenizer.hf import HFTokenizer

        return HFTokenizer(vocab_file)
    if kind == "GPT2BPETokenizer":
        from neox.tokenizer.gpt2 import GPT2BPETokenizer

        return GPT2BPETokenizer(vocab_file, getattr(cfg, "merge_file", None))
    if kind == "CharLevelTokenizer":
        return CharLevelTokenizer()
    raise ConfigError(f"tokenizer_type: {kind!r} is not supported; expected one of {list(TOKENIZER_TYPES)}")
