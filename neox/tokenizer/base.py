"""The interface every tokenizer implements."""

from __future__ import annotations

from abc import ABC, abstractmethod


class Tokenizer(ABC):
    """``vocab_size``, ``eod`` (end-of-document id), ``tokenize`` and ``detokenize``."""

    name: str = "Tokenizer"

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can emit (before padding for the embedding)."""

    @property
    @abstractmethod
    def eod(self) -> int:
        """Id appended after each document."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added)."""

    @abstractmethod
    def detokenize(self, token_ids: list[int]) -> str:
        """Text of ``token_ids``."""

    # NeoX spells these with an ``_id`` suffix in places; keep both spellings working.
    @property
    def eod_id(self) -> int:
        return self.eod

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eod={self.eod})"


class CharLevelTokenizer(Tokenizer):
    """GPT-NeoX's byte-level character tokenizer: ids are UTF-8 bytes, eod 0."""

    def __init__(self, vocab_size: int = 512) -> None:
        self._vocab_size = vocab_size

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return 0

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, token_ids: list[int]) -> str:
        return bytes(min(max(int(t), 0), 255) for t in token_ids).decode("utf-8", errors="replace")
