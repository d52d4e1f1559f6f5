"""neox.config: GPT-NeoX YAML configs as a frozen, typed dataclass tree."""

from neox.config.args import NeoXArgs
from neox.config.data import DataConfig, TokenizerConfig
from neox.config.model import ModelConfig
from neox.config.optim import LRConfig, OptimizerConfig, PrecisionConfig
from neox.config.parallel import ParallelConfig
from neox.config.run import CheckpointConfig, LauncherConfig, LoggingConfig, TextGenConfig, TrainingConfig

__all__ = [
    "NeoXArgs",
    "ModelConfig",
    "ParallelConfig",
    "OptimizerConfig",
    "LRConfig",
    "PrecisionConfig",
    "DataConfig",
    "TokenizerConfig",
    "TrainingConfig",
    "CheckpointConfig",
    "LoggingConfig",
    "TextGenConfig",
    "LauncherConfig",
]
