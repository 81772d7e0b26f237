"""Typed configuration: the dataset TOML (``dataset``) and, later, the training flags."""

from masktrain.config.dataset import (
    BucketConfig,
    ConfigError,
    DatasetConfig,
    ImageDatasetConfig,
    VideoDatasetConfig,
    load_dataset_config,
)

__all__ = [
    "BucketConfig",
    "ConfigError",
    "DatasetConfig",
    "ImageDatasetConfig",
    "VideoDatasetConfig",
    "load_dataset_config",
]
