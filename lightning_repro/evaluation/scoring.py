"""RP, MAE, GL and the memorised fraction of samples: the one place they are computed (Zhang et al., ICML 2024).

    RP  = P( <f(x_A(z)), f(x_B(z))> > tau )       seed-paired samples of two models, descriptor f
    MAE = E | x_A(z) - x_B(z) |  in [0, 255]       (mean, and the fraction of pairs below a threshold)
    GL  = 1 - P( max_j <f(x), f(y_j)> > tau )      y_j: the model's training images; the rest is memorised

``featurize`` computes descriptor features in fixed chunks of ``FEATURE_CHUNK`` images, dealt round robin to
the torchrun ranks and all-gathered, so every rank holds all features and the torchmetrics of ``metrics.scores``
run once on them: the scores equal the one-process scores exactly (see ``distributed``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .distributed import all_gather, rank_world

__all__ = [
    "FEATURE_CHUNK",
    "FeatureSet",
    "featurize",
    "score_pair",
    "generalization",
    "nearest_training",
    "choose_descriptor",
    "rp",
    "gl",
    "mae",
    "mean_similarity",
    "conditional_rp",
]

#: images per descriptor call (and per rank's share of the feature work); fixed so that one process and N
#: processes run the descriptor on the same batches and get bit-identical features
FEATURE_CHUNK = 1024


@dataclass(frozen=True)
class FeatureSet:
    """Images (N x C x H x W: uint8, or float in [-1, 1]) and their descriptor features (N x D, float32, CPU)."""

    images: Tensor
    features: Tensor


def _nchw(images: np.ndarray | Tensor) -> Tensor:
    if isinstance(images, np.ndarray):  # N x H x W x C, as stored in sample files
        return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    return images


def featurize(descriptor, images: np.ndarray | Tensor) -> FeatureSet:
    """``images`` (uint8 N x H x W x C arrays of sample files, or N x C x H x W tensors) with their features."""
    x = _nchw(images)
    if x.shape[0] == 0:
        return FeatureSet(
            x, descriptor(x).float().cpu()
        )  # the descriptor's own sentence about an empty batch
    rank, world = rank_world()
    chunks = range(0, x.shape[0], FEATURE_CHUNK)
    mine = {i: descriptor(x[i : i + FEATURE_CHUNK]).float().cpu() for i in chunks[rank::world]}
    parts: dict[int, Tensor] = {}
    for got in all_gather(mine):
        parts.update(got)
    return FeatureSet(x, torch.cat([parts[i] for i in chunks]))


def score_pair(
    a: FeatureSet, b: FeatureSet, threshold: float, names: Sequence[str] = ("A", "B")
) -> dict[str, float]:
    """RP, mean similarity and MAE of the seed-paired rows of ``a`` and ``b``.

    Returns ``rp``, ``mean_similarity``, ``mae_mean``, ``mae_score``, ``mae_threshold`` and ``n`` (pairs).
    """
    from ..metrics import MAEScore, ReproducibilityScore

    if a.features.shape[1] != b.features.shape[1]:
        raise ValueError(
            f"the features of {names[0]} have dimension {a.features.shape[1]} but those of {names[1]} have "
            f"{b.features.shape[1]}; both sides must be described by the same descriptor."
        )
    # every rank holds all the (gathered) features, so the metric states must not be summed across ranks again
    rp = ReproducibilityScore(threshold=threshold, sync_on_compute=False)
    rp.update(a.features, b.features)
    mae = MAEScore(sync_on_compute=False)
    mae.update(a.images, b.images)
    s_rp, s_mae = rp.summary(), mae.summary()
    return {
        "rp": s_rp["rp"],
        "mean_similarity": s_rp["mean_similarity"],
        "mae_mean": s_mae["mae_mean"],
        "mae_score": s_mae["mae_score"],
        "mae_threshold": s_mae["threshold"],
        "n": int(s_rp["num_pairs"]),
    }


def _score(training: FeatureSet, threshold: float):
    from ..metrics import GeneralizationScore

    return GeneralizationScore(
        training.features, threshold=threshold, sync_on_compute=False
    )  # features are gathered


def generalization(
    samples: FeatureSet, training: FeatureSet, threshold: float, name: str = "the samples"
) -> dict[str, float]:
    """GL of ``samples`` against the training set: ``gl``, ``memorized`` (= 1 - GL), ``mean_max_similarity``."""
    if training.features.shape[1] != samples.features.shape[1]:
        raise ValueError(
            f"the samples of {name} have feature dimension {samples.features.shape[1]} but its training images have "
            f"{training.features.shape[1]}; they must have the same image shape."
        )
    gl = _score(training, threshold)
    gl.update(samples.features)
    s = gl.summary()
    return {
        "gl": s["gl"],
        "memorized": s["memorized_fraction"],
        "mean_max_similarity": s["mean_max_similarity"],
    }


def nearest_training(samples: FeatureSet, training: FeatureSet, threshold: float) -> Tensor:
    """The training image nearest (by descriptor similarity) to each sample, as float N x C x H x W."""
    _, idx = _score(training, threshold).nearest(samples.features)
    return training.images[idx.cpu()].float()


def copy_chance(feats_a: Tensor, feats_b: Tensor, train_feats: Tensor, threshold: float) -> float:
    """``sum_i p_i q_i``: the probability that a sample of A and an independent sample of B are copies of the same
    training image, with ``p_i`` (``q_i``) the fraction of A's (B's) samples whose nearest training image is ``i``
    at a similarity above ``threshold``.  Where both models memorise, it is what RP between different seeds (the
    null baseline) is expected to be: about 1/N for N training images used evenly, not 0."""
    from ..metrics.scores import nearest_neighbours

    n = train_feats.shape[0]

    def usage(feats: Tensor) -> Tensor:
        sim, idx = nearest_neighbours(feats, train_feats)
        return torch.bincount(idx[sim > threshold].cpu(), minlength=n).double() / max(feats.shape[0], 1)

    return float((usage(feats_a) * usage(feats_b)).sum())


def choose_descriptor(name: str | None, image_shape: Sequence[int]) -> tuple[str, str]:
    """(descriptor name, reason): SSCD for 3-channel images of >= 32 px (the paper), pixel otherwise."""
    c, h, w = image_shape
    if name is not None:
        return name, "--descriptor"
    if c == 3 and min(h, w) >= 32:
        return "sscd", f"{c}x{h}x{w} colour images, as the paper"
    return "pixel", f"{c}x{h}x{w} images: SSCD needs 3-channel images of >= 32 px"


# -- feature-level scores of the studies (features or images in, float out) ------------------------------
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


def conditional_rp(feats_a: Tensor, feats_b: Tensor, labels: Tensor, num_classes: int, threshold: float) -> dict:
    """Per-class RP of class-conditional samples (Sec. 4.1): ``overall``, ``per_class`` and ``counts`` tensors."""
    from ..metrics import ConditionalReproducibilityScore

    metric = ConditionalReproducibilityScore(num_classes, threshold=threshold)
    metric.update(feats_a, feats_b, labels)
    return metric.compute()
