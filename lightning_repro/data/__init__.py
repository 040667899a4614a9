"""Data: image sources and the size-controlled, nested training subsets."""

from .datamodule import SubsetDataModule, subset_indices
from .sources import ImageSource, get_source

__all__ = ["SubsetDataModule", "subset_indices", "ImageSource", "get_source"]
