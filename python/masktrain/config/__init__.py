"""Every settings dataclass of masktrain, torch-free and without the native extension: the dataset
TOML, and the settings of each command (``cache``, ``train`` with its mask-loss and timestep
flags, ``demo``, ``convert-alpha``). Each is frozen and checks its values, rules that span flags
included, when it is built, with a message naming the flag or key (a ``SettingError``, exit 2).
What needs the file system or the process group is checked next by the command's preflight,
still before any model loads."""

from masktrain.config.cache import CacheConfig
from masktrain.config.convert_alpha import ConvertAlphaConfig
from masktrain.config.dataset import (
    BUCKET_STEP,
    BucketConfig,
    DatasetConfig,
    ImageDatasetConfig,
    VideoDatasetConfig,
    load_dataset_config,
)
from masktrain.config.demo import DemoConfig
from masktrain.config.mask_loss import MaskLossSettings
from masktrain.config.memory import MemorySettings
from masktrain.config.timesteps import TimestepSettings
from masktrain.config.train import NetworkSettings, OptimSettings, TrainConfig
from masktrain.errors import ConfigError

__all__ = [
    "BUCKET_STEP",
    "BucketConfig",
    "CacheConfig",
    "ConfigError",
    "ConvertAlphaConfig",
    "DatasetConfig",
    "DemoConfig",
    "ImageDatasetConfig",
    "MaskLossSettings",
    "MemorySettings",
    "NetworkSettings",
    "OptimSettings",
    "TimestepSettings",
    "TrainConfig",
    "VideoDatasetConfig",
    "load_dataset_config",
]
