"""NeoXArgs: the frozen root config, one attribute per section."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from neox.config.data import DataConfig, TokenizerConfig
from neox.config.model import ModelConfig
from neox.config.optim import LRConfig, OptimizerConfig, PrecisionConfig
from neox.config.parallel import ParallelConfig
from neox.config.run import CheckpointConfig, LauncherConfig, LoggingConfig, TextGenConfig, TrainingConfig


@dataclass(frozen=True)
class NeoXArgs:
    """All arguments of one run; ``args.model.hidden_size`` is the flat NeoX key ``hidden_size``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr: LRConfig = field(default_factory=LRConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    textgen: TextGenConfig = field(default_factory=TextGenConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    compat: dict[str, Any] = field(default_factory=dict)
    """GPT-NeoX keys accepted for compatibility that have no effect here (see docs/config.md)."""
