"""SentencePiece ``tokenizer.model`` files (LLaMA, CodeLlama, our quickstart tokenizer)."""

from __future__ import annotations

import os

from neox.errors import DataError
from neox.tokenizer.base import Tokenizer


class SPMTokenizer(Tokenizer):
    """EOD is ``<|endoftext|>`` when the model has that piece (as NeoX), else the model's ``</s>``."""

    name = "SPMTokenizer"

    def __init__(self, model_file: str) -> None:
        import sentencepiece as spm

        if not model_file or not os.path.isfile(model_file):
            raise DataError(f"vocab_file: SentencePiece model {model_file!r} not found")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=model_file)
        except (RuntimeError, OSError) as err:
            raise DataError(f"{model_file}: not a SentencePiece model ({err})") from None
        self.model_file = model_file
        self._eod = self._find_eod()

    def _find_eod(self) -> int:
        sp = self._sp
        eot = sp.piece_to_id("<|endoftext|>")
        if eot != sp.unk_id() and sp.id_to_piece(eot) == "<|endoftext|>":
            return eot
        if sp.eos_id() >= 0:
            return sp.eos_id()
        eos = sp.piece_to_id("</s>")
        if eos != sp.unk_id():
            return eos
        raise DataError(f"{self.model_file}: SentencePiece model has neither <|endoftext|> nor </s> for EOD")

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eod(self) -> int:
        return self._eod

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def detokenize(self, token_ids: list[int]) -> str:
        return self._sp.decode([int(t) for t in token_ids])

    def __getstate__(self) -> dict:
        # The processor is a C++ object: rebuild it from the file in worker processes.
        return {"model_file": self.model_file}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_file"])
