"""GPT-2 byte-level BPE from ``vocab.json`` + ``merges.txt`` (no download, no Python BPE loop)."""

from __future__ import annotations

import json
import os

from neox.errors import DataError
from neox.tokenizer.hf import TokenizersBacked


def _build(vocab_file: str, merge_file: str):
    from tokenizers import Tokenizer as _HF
    from tokenizers import decoders, models, pre_tokenizers

    bpe = models.BPE.from_file(vocab_file, merge_file)
    tok = _HF(bpe)
    # GPT-2: split with its regex, map bytes to unicode, no leading space added.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


class GPT2BPETokenizer(TokenizersBacked):
    """GPT-2 tokenizer; EOD is ``<|endoftext|>``."""

    name = "GPT2BPETokenizer"

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        for key, path in (("vocab_file", vocab_file), ("merge_file", merge_file)):
            if not path or not os.path.isfile(path):
                raise DataError(f"{key}: GPT-2 BPE file {path!r} not found")
        try:
            with open(vocab_file, encoding="utf-8") as f:
                vocab = json.load(f)
            self._tok = _build(vocab_file, merge_file)
        except (ValueError, Exception) as err:  # tokenizers raises a bare Exception on bad files
            raise DataError(f"{vocab_file} / {merge_file}: not a GPT-2 vocab.json + merges.txt ({err})") from None
        if "<|endoftext|>" not in vocab:
            raise DataError(f"{vocab_file}: GPT-2 vocabulary has no <|endoftext|> token for EOD")
        self.vocab_file, self.merge_file = vocab_file, merge_file
        self._eod = int(vocab["<|endoftext|>"])
        self._vocab_size = len(vocab)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def __getstate__(self) -> dict:
        return {"vocab_file": self.vocab_file, "merge_file": self.merge_file}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["vocab_file"], state["merge_file"])
