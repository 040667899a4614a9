"""Similarity metrics of Zhang et al. (ICML 2024), Sec. 2.1: image descriptors and the RP / MAE / GL scores.

``descriptors``: ``SSCDDescriptor`` (the paper's), ``PixelDescriptor`` (normalised correlation), images ->
L2-normalised features.  ``scores``: torchmetrics ``Metric``s (sum/count states, exact under DDP) and
their functional twins.
"""

from .descriptors import PixelDescriptor, SSCDDescriptor, get_descriptor
from .scores import (
    ConditionalReproducibilityScore,
    GeneralizationScore,
    MAEScore,
    ReproducibilityScore,
    gl_score,
    mae_score,
    nearest_neighbours,
    paired_similarity,
    pairwise_mae,
    rp_score,
)

__all__ = [
    "PixelDescriptor",
    "SSCDDescriptor",
    "get_descriptor",
    "ReproducibilityScore",
    "MAEScore",
    "GeneralizationScore",
    "ConditionalReproducibilityScore",
    "rp_score",
    "mae_score",
    "gl_score",
    "nearest_neighbours",
    "paired_similarity",
    "pairwise_mae",
]
