"""Tokenizers: SPM EOD rule, HF tokenizer.json, GPT-2 vocab+merges against a pure-Python GPT-2 BPE."""

from __future__ import annotations

import json
import pickle
from functools import cache

import pytest
import regex

from neox.config.data import TokenizerConfig
from neox.errors import ConfigError, DataError
from neox.tokenizer import CharLevelTokenizer, build_tokenizer
from tests.fixtures.data.tokenizers import corpus, train_bpe, train_spm

TEXTS = ["the quick brown fox", "  def foo(bar):\n    return bar + 42\n", "naïve café ☃ 😀", "", "zoo;zoo zoo"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tok"))
    vocab, merges, tj = train_bpe(d)
    return {"spm": train_spm(d), "spm_eot": train_spm(d, with_endoftext=True), "vocab": vocab, "merges": merges,
            "tokenizer.json": tj}


def test_spm_eod_rule_and_roundtrip(files):
    import sentencepiece as spm

    plain = build_tokenizer(TokenizerConfig(tokenizer_type="SPMTokenizer", vocab_file=files["spm"]))
    ref = spm.SentencePieceProcessor(model_file=files["spm"])
    assert plain.eod == ref.piece_to_id("</s>") == 2
    assert plain.vocab_size == ref.get_piece_size()
    eot = build_tokenizer(TokenizerConfig(tokenizer_type="SPMTokenizer", vocab_file=files["spm_eot"]))
    assert eot.eod == spm.SentencePieceProcessor(model_file=files["spm_eot"]).piece_to_id("<|endoftext|>")
    assert eot.eod != 2
    for text in TEXTS:
        ids = plain.tokenize(text)
        assert ids == ref.encode(text)
        assert plain.detokenize(ids) == ref.decode(ids)
    clone = pickle.loads(pickle.dumps(plain))
    assert clone.tokenize(TEXTS[0]) == plain.tokenize(TEXTS[0])


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's printable mapping of the 256 bytes (openai/gpt-2 src/encoder.py).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class ReferenceGPT2:
    """openai/gpt-2's encoder, re-written from the paper's description (merge lowest-rank pair first)."""

    PAT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

    def __init__(self, vocab_file, merges_file):
        self.encoder = json.load(open(vocab_file, encoding="utf-8"))
        lines = open(merges_file, encoding="utf-8").read().split("\n")
        merges = [tuple(m.split()) for m in lines if m and not m.startswith("#version")]
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.byte_map = _bytes_to_unicode()

    @cache  # noqa: B019 - test-only helper
    def bpe(self, token):
        word = list(token)
        while len(word) > 1:
            pairs = [(self.ranks.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(word, word[1:]))]
            rank, first = min(pairs)
            if rank == float("inf"):
                break
            a, b = word[first], word[first + 1]
            out, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == a and word[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = out
        return tuple(word)

    def encode(self, text):
        ids = []
        for piece in self.PAT.findall(text):
            mapped = "".join(self.byte_map[b] for b in piece.encode("utf-8"))
            ids += [self.encoder[t] for t in self.bpe(mapped)]
        return ids


def test_gpt2_bpe_and_hf_match_reference(files):
    gpt2 = build_tokenizer(TokenizerConfig(tokenizer_type="GPT2BPETokenizer", vocab_file=files["vocab"],
                                           merge_file=files["merges"]))
    hf = build_tokenizer(TokenizerConfig(tokenizer_type="HFTokenizer", vocab_file=files["tokenizer.json"]))
    ref = ReferenceGPT2(files["vocab"], files["merges"])
    vocab = json.load(open(files["vocab"]))
    assert gpt2.eod == hf.eod == vocab["<|endoftext|>"]
    assert gpt2.vocab_size == hf.vocab_size == len(vocab)
    for text in TEXTS + corpus(30):
        ids = ref.encode(text)
        assert gpt2.tokenize(text) == ids, text
        assert hf.tokenize(text) == ids, text
        assert gpt2.detokenize(ids) == text
        assert hf.detokenize(ids) == text
    assert pickle.loads(pickle.dumps(hf)).tokenize("fox") == hf.tokenize("fox")


def test_char_level():
    tok = build_tokenizer(TokenizerConfig(tokenizer_type="CharLevelTokenizer"))
    assert isinstance(tok, CharLevelTokenizer) and tok.eod == 0 and tok.vocab_size == 512
    assert tok.tokenize("hé") == list("hé".encode())
    assert tok.detokenize(tok.tokenize("hé")) == "hé"


def test_errors(tmp_path):
    with pytest.raises(ConfigError, match="TiktokenTokenizer"):
        build_tokenizer(TokenizerConfig(tokenizer_type="TiktokenTokenizer"))
    with pytest.raises(DataError, match="not found"):
        build_tokenizer(TokenizerConfig(tokenizer_type="SPMTokenizer", vocab_file=str(tmp_path / "none.model")))
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a SentencePiece model"):
        build_tokenizer(TokenizerConfig(tokenizer_type="SPMTokenizer", vocab_file=str(bad)))
    with pytest.raises(DataError, match="merge_file"):
        build_tokenizer(TokenizerConfig(tokenizer_type="GPT2BPETokenizer", vocab_file=str(bad), merge_file=None))
    bad_json = tmp_path / "tokenizer.json"
    bad_json.write_text("{")
    with pytest.raises(DataError, match="not a Hugging Face tokenizer.json"):
        build_tokenizer(TokenizerConfig(tokenizer_type="HFTokenizer", vocab_file=str(bad_json)))


def test_train_tokenizer_tool_round_trips_code(tmp_path):
    from tools.train_tokenizer import train

    src = tmp_path / "code.jsonl"
    code = "def f(x):\n    return x  + 1\n\n\tclass A:\n        pass  # done\n"
    src.write_text("\n".join(json.dumps({"text": code + line}) for line in corpus(200)) + "\n")
    model = train(str(src), str(tmp_path / "tok"), 320, num_threads=1)
    tok = build_tokenizer(TokenizerConfig(tokenizer_type="SPMTokenizer", vocab_file=model))
    assert tok.vocab_size == 320 and tok.eod == 2
    for text in (code, "naïve ☃  x\n\n  y"):  # whitespace, newlines and unseen characters survive
        assert tok.detokenize(tok.tokenize(text)) == text
