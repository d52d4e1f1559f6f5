#!/usr/bin/env python
"""Train a SentencePiece BPE tokenizer (LLaMA-style settings) on jsonl / zst / parquet / text files.

    python tools/train_tokenizer.py --input corpus.jsonl --model-prefix out/tokenizer --vocab-size 8192

Writes ``{model_prefix}.model`` and ``{model_prefix}.vocab``. Settings follow LLaMA's tokenizer:
BPE, byte fallback (any text encodes), digits split, whitespace kept verbatim (code round-trips).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from neox.errors import DataError, NeoXError, format_error  # noqa: E402


def iter_sentences(inputs: str, keys: list[str], max_chars: int) -> Iterator[str]:
    """Lines of every document (SentencePiece trains on lines; newlines become byte tokens)."""
    from neox.data.preprocess import Encoder, expand_inputs, iter_records

    paths = [p for p in inputs.split(",") if p.endswith(".txt")]
    others = ",".join(p for p in inputs.split(",") if not p.endswith(".txt"))
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip() and len(line) <= max_chars:
                    yield line.rstrip("\n")
    if not others:
        return
    enc = Encoder(None, keys, append_eod=False, dtype="int32")
    for rec in iter_records(expand_inputs(others), keys):
        try:
            texts = enc.texts(rec)
        except ValueError as err:
            raise DataError(f"{rec.source}:{rec.line}: {err}") from None
        for text in texts.values():
            for line in text.split("\n"):
                if line.strip() and len(line) <= max_chars:
                    yield line


def train(inputs: str, model_prefix: str, vocab_size: int, *, keys: tuple[str, ...] = ("text",),
          model_type: str = "bpe", input_sentence_size: int = 2_000_000, num_threads: int = 2,
          user_defined_symbols: tuple[str, ...] = (), max_sentence_length: int = 4192) -> str:
    """Train and return the path of ``{model_prefix}.model`` (byte-identical for identical input)."""
    import io

    import sentencepiece as spm
    from tqdm import tqdm

    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    lines = tqdm(iter_sentences(inputs, list(keys), max_sentence_length), unit="line", desc="reading", leave=False)
    # Written through model_writer so the model does not embed a temporary path: rebuilds match.
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type=model_type,
        character_coverage=0.9999, byte_fallback=True, split_digits=True,
        allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", max_sentence_length=max_sentence_length,
        input_sentence_size=input_sentence_size, shuffle_input_sentence=True, num_threads=num_threads,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=list(user_defined_symbols),
        minloglevel=2,
    )
    with open(model_prefix + ".model", "wb") as f:
        f.write(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    with open(model_prefix + ".vocab", "w", encoding="utf-8") as f:
        for i in range(sp.get_piece_size()):
            f.write(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n")
    return model_prefix + ".model"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="comma-separated files/folders (.txt, .jsonl, .jsonl.zst, .parquet)")
    p.add_argument("--jsonl-keys", nargs="+", default=["text"])
    p.add_argument("--model-prefix", required=True, help="writes {prefix}.model and {prefix}.vocab")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    p.add_argument("--input-sentence-size", type=int, default=2_000_000, help="lines sampled for training")
    p.add_argument("--num-threads", type=int, default=2)
    p.add_argument("--user-defined-symbols", nargs="*", default=[], help="e.g. '<|endoftext|>'")
    args = p.parse_args(argv)
    start = time.perf_counter()
    try:
        path = train(args.input, args.model_prefix, args.vocab_size, keys=tuple(args.jsonl_keys),
                     model_type=args.model_type, input_sentence_size=args.input_sentence_size,
                     num_threads=args.num_threads, user_defined_symbols=tuple(args.user_defined_symbols))
    except NeoXError as err:
        print(format_error(err), file=sys.stderr)
        return 2
    except RuntimeError as err:  # sentencepiece reports bad settings / empty input this way
        print(format_error(DataError(f"--input {args.input}: sentencepiece training failed: {err}")), file=sys.stderr)
        return 2
    print(f"wrote {path} (vocab {args.vocab_size}) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
