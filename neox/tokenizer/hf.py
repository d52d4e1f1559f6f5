"""Hugging Face ``tokenizer.json`` files, through the ``tokenizers`` library."""

from __future__ import annotations

import os
from typing import Any

from neox.errors import DataError
from neox.tokenizer.base import Tokenizer

# Tried in order: NeoX's own, SentencePiece-style, Llama-3 style.
_EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")


class TokenizersBacked(Tokenizer):
    """Encoding and decoding through a ``tokenizers.Tokenizer`` held in ``_tok``, EOD id in ``_eod``."""

    _tok: Any
    _eod: int

    @property
    def eod(self) -> int:
        return self._eod

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def detokenize(self, token_ids: list[int]) -> str:
        return self._tok.decode([int(t) for t in token_ids], skip_special_tokens=False)


class HFTokenizer(TokenizersBacked):
    """A ``tokenizers.Tokenizer`` loaded from ``tokenizer.json``; EOD ``<|endoftext|>`` (or ``</s>``)."""

    name = "HFTokenizer"

    def __init__(self, vocab_file: str) -> None:
        from tokenizers import Tokenizer as _HF

        if not vocab_file or not os.path.isfile(vocab_file):
            raise DataError(f"vocab_file: tokenizer.json {vocab_file!r} not found")
        try:
            self._tok = _HF.from_file(vocab_file)
        except Exception as err:  # tokenizers raises a bare Exception on bad JSON
            raise DataError(f"{vocab_file}: not a Hugging Face tokenizer.json ({err})") from None
        self.vocab_file = vocab_file
        self._eod = self._find_eod()

    def _find_eod(self) -> int:
        for piece in _EOD_CANDIDATES:
            tid = self._tok.token_to_id(piece)
            if tid is not None:
                return tid
        raise DataError(f"{self.vocab_file}: no end-of-document token; expected one of {list(_EOD_CANDIDATES)}")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __getstate__(self) -> dict:
        return {"vocab_file": self.vocab_file}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["vocab_file"])
