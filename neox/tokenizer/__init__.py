"""Tokenizers behind one interface (``vocab_size``, ``eod``, ``tokenize``, ``detokenize``)."""

from neox.tokenizer.base import CharLevelTokenizer, Tokenizer
from neox.tokenizer.build import build_tokenizer

__all__ = ["CharLevelTokenizer", "Tokenizer", "build_tokenizer"]
