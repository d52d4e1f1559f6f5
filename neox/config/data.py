"""DataConfig and TokenizerConfig."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class DataConfig:
    """Data arguments."""

    data_path: str | None = None
    """Prefix of one .bin/.idx dataset, split into train/valid/test by `split`."""

    train_data_paths: list[str] = field(default_factory=list)
    """Prefixes of the training datasets (a weighted mixture)."""

    train_data_weights: list[float] = field(default_factory=list)
    """Sampling weight of each training dataset. Empty: equal weights."""

    valid_data_paths: list[str] = field(default_factory=list)
    """Prefixes of the validation datasets."""

    valid_data_weights: list[float] = field(default_factory=list)
    """Sampling weight of each validation dataset. Empty: equal weights."""

    test_data_paths: list[str] = field(default_factory=list)
    """Prefixes of the test datasets."""

    test_data_weights: list[float] = field(default_factory=list)
    """Sampling weight of each test dataset. Empty: equal weights."""

    split: str = "969, 30, 1"
    """Train/valid/test proportions of data_path, comma-separated."""

    data_impl: Literal["mmap", "infer", "cached", "lazy"] = "infer"
    """Indexed dataset implementation; only the mmap format is read ('infer' and 'cached' read it too)."""

    mmap_warmup: bool = False
    """Read the dataset files once at start to warm the page cache."""

    eod_mask_loss: bool = False
    """Mask the loss on end-of-document tokens."""

    num_workers: int = 2
    """DataLoader worker processes per rank."""

    weight_by_num_documents: bool = False
    """Weight the mixture by document counts (p ~ n**alpha) instead of the given weights."""

    weighted_sampler_alpha: float = 1.0
    """alpha of weight_by_num_documents."""


@dataclass(frozen=True)
class TokenizerConfig:
    """Tokenizer arguments."""

    tokenizer_type: Literal[
        "GPT2BPETokenizer", "HFTokenizer", "HFGPT2Tokenizer", "SPMTokenizer", "CharLevelTokenizer", "TiktokenTokenizer"
    ] = "GPT2BPETokenizer"
    """Tokenizer kind."""

    vocab_file: str | None = None
    """Vocabulary: GPT-2 vocab.json, an HF tokenizer.json, or a SentencePiece .model."""

    merge_file: str | None = None
    """GPT-2 BPE merges file."""
