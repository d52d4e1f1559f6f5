"""The tokenizer's vocabulary size, read cheaply at launch so padded_vocab_size is known up front.

Returns None when the file is not readable here (e.g. a login node); pretrain then calls
``args.with_vocab_size(tokenizer.vocab_size)``.
"""

from __future__ import annotations

import json
from pathlib import Path

CHAR_LEVEL_VOCAB = 512  # NeoX's CharLevelTokenizer


def probe_vocab_size(tokenizer_type: str, vocab_file: str | None) -> int | None:
    """Vocabulary size as the NeoX tokenizer of this type reports it, or None."""
    if tokenizer_type == "CharLevelTokenizer":
        return CHAR_LEVEL_VOCAB
    if not vocab_file or not Path(vocab_file).is_file():
        return None
    try:
        if tokenizer_type == "SPMTokenizer":
            import sentencepiece

            return int(sentencepiece.SentencePieceProcessor(model_file=str(vocab_file)).vocab_size())
        if tokenizer_type == "HFTokenizer":
            from tokenizers import Tokenizer

            return int(Tokenizer.from_file(str(vocab_file)).get_vocab_size())
        if tokenizer_type == "GPT2BPETokenizer":
            return len(json.loads(Path(vocab_file).read_text()))
    except Exception:  # an unreadable tokenizer is reported when pretrain builds it
        return None
    return None
