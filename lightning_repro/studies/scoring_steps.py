"""The numbers the studies report, in one place: RP (Sec. 2.1), GL, MAE and the mean similarity of paired
samples, each ``features (or images) in, float out``, computed by ``lightning_repro.metrics``.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["rp", "gl", "mae", "mean_similarity"]


def rp(feats_a: Tensor, feats_b: Tensor, threshold: float) -> float:
    """RP: fraction of seeds whose two samples' features have cosine similarity above ``threshold``."""
    from ..metrics import rp_score

    return rp_score(feats_a, feats_b, threshold)


def gl(sample_feats: Tensor, train_feats: Tensor, threshold: float) -> float:
    """GL: fraction of samples with no training feature above ``threshold`` (1 - copy rate)."""
    from ..metrics import gl_score

    return gl_score(sample_feats, train_feats, threshold)


def mae(images_a: Tensor, images_b: Tensor) -> float:
    """Mean absolute difference of paired images in [-1, 1], in 0-255 units."""
    from ..metrics import mae_score

    return mae_score(images_a, images_b)["mae_mean"]


def mean_similarity(feats_a: Tensor, feats_b: Tensor) -> float:
    """Mean cosine similarity of paired features."""
    from ..metrics import paired_similarity

    return float(paired_similarity(feats_a, feats_b).mean())
