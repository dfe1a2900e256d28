"""LightningDataModules: image shards for phase 1, the feature cache for phase 2."""

from datamodules.cached_features import FeatureCacheDataModule
from datamodules.image_shards import ImageShardDataModule

__all__ = ["FeatureCacheDataModule", "ImageShardDataModule"]
