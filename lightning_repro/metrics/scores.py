"""Reproducibility (RP), MAE and generalization (GL) scores of Zhang et al., ICML 2024, Sec. 2.1.

For seed-paired samples ``x_A(z), x_B(z)`` of two models (same initial noise ``z``, deterministic
sampler) and a descriptor ``f`` (SSCD in the paper; cosine similarity of L2-normalised features):

* ``RP = P( <f(x_A), f(x_B)> > tau )``, ``tau = 0.6``                         (``ReproducibilityScore``)
* MAE of the same pairs in ``[0, 255]`` pixel space: the mean, and the fraction of pairs whose MAE is
  below a threshold                                                          (``MAEScore``)
* ``GL = 1 - P( max_j <f(x), f(y_j)> > tau )`` over the model's training set ``{y_j}``; the
  complement ``P(max_j ... > tau)`` is the *memorized fraction*               (``GeneralizationScore``)
* conditional RP (Sec. 4.1): RP per class, between two class-conditional models sampled with the
  same label, or between an unconditional model and a conditional one (the label being the
  conditional model's class)                                                  (``ConditionalReproducibilityScore``)

Every metric is a torchmetrics ``Metric`` whose states are sums and counts (``dist_reduce_fx="sum"``),
so an evaluation split over DDP ranks gives exactly the single-process result.  Comparisons are strict
(``similarity > tau``, ``MAE < threshold``), as in the paper's script.  Similarities are computed in the
promoted floating dtype of the inputs (float32 for descriptor outputs, float64 if you pass float64).

Functional twins for use outside Lightning: ``rp_score``, ``mae_score``, ``gl_score``,
``nearest_neighbours``, ``paired_similarity``, ``pairwise_mae``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

__all__ = [
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
    "DEFAULT_SIM_THRESHOLD",
    "DEFAULT_MAE_THRESHOLD",
]

#: The paper's SSCD similarity threshold (Sec. 2.1).
DEFAULT_SIM_THRESHOLD = 0.6

#: Default MAE threshold in [0, 255] units (the paper prints none).  12.75 = 0.1 in the suite's [-1, 1]
#: scale, i.e. 5% of the range: a pair differing by i.i.d. noise of std 0.1 ([-1, 1] units) has MAE
#: ~10.2-10.7 and counts as reproduced, while distinct 32 x 32 images (smooth CIFAR-like or uniform
#: random) have nearest-neighbour MAE >= 54; on 8 x 8 digits 1% of the images have a distinct neighbour
#: under 8.7 (min 4.0, median 17.2), so near-duplicate digits may count.  Measured on the sets of
#: ``descriptors.pixel_calibration``.
DEFAULT_MAE_THRESHOLD = 12.75


# ----------------------------------------------------------------------------- checks and helpers


def _check_threshold(threshold: float) -> float:
    t = float(threshold)
    if not -1.0 < t <= 1.0:  # also rejects NaN
        raise ValueError(f"threshold must be a cosine similarity in (-1, 1], got {threshold}.")
    return t


def _check_mae_threshold(threshold: float) -> float:
    t = float(threshold)
    if not 0.0 < t <= 255.0:
        raise ValueError(
            f"threshold must be a mean absolute difference in (0, 255] pixel levels, got {threshold}."
        )
    return t


def _check_features(x: Any, name: str) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim != 2 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a floating-point (N, D) feature tensor, got {shape}.")
    return x


def _float_dtype(*xs: Tensor) -> torch.dtype:
    dt = xs[0].dtype
    for x in xs[1:]:
        dt = torch.promote_types(dt, x.dtype)
    return dt if dt.is_floating_point else torch.float32


def _check_pair(fa: Tensor, fb: Tensor, a: str = "feats_a", b: str = "feats_b") -> None:
    _check_features(fa, a)
    _check_features(fb, b)
    if fa.shape[1] != fb.shape[1]:
        raise ValueError(
            f"{a} has dimension {fa.shape[1]} but {b} has {fb.shape[1]}; both must come from the same descriptor."
        )
    if fa.shape[0] != fb.shape[0]:
        raise ValueError(
            f"{a} has {fa.shape[0]} rows but {b} has {fb.shape[0]}; pairs are compared row by row (seed by seed)."
        )


def paired_similarity(feats_a: Tensor, feats_b: Tensor) -> Tensor:
    """Cosine similarity of each row pair: ``(N,)``; rows are (re-)normalised first."""
    _check_pair(feats_a, feats_b)
    dt = _float_dtype(feats_a, feats_b)
    fb = feats_b.to(device=feats_a.device, dtype=dt)
    return (F.normalize(feats_a.to(dt), dim=1) * F.normalize(fb, dim=1)).sum(dim=1)


def _images_to_255(images: Tensor, name: str) -> Tensor:
    if not isinstance(images, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of images, got {type(images).__name__}.")
    if images.dtype == torch.uint8:
        return images.to(torch.float64)
    if images.is_floating_point():
        return (images.to(torch.float64).clamp(-1.0, 1.0) + 1.0) * 127.5
    raise ValueError(f"{name} must be uint8 in [0, 255] or float in [-1, 1], got dtype {images.dtype}.")


def pairwise_mae(images_a: Tensor, images_b: Tensor) -> Tensor:
    """Per-pair mean absolute difference in ``[0, 255]`` pixel levels, float64 ``(N,)``.

    Images: ``uint8`` ``[0, 255]`` or float ``[-1, 1]`` (clamped, not rounded to integer levels),
    any layout with the batch first; both tensors must have the same shape.
    """
    a = _images_to_255(images_a, "images_a")
    b = _images_to_255(images_b, "images_b")
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(
            f"images_a has shape {tuple(a.shape)} but images_b has {tuple(b.shape)}; paired image batches "
            "(N, ...) of one shape are expected."
        )
    return (a - b.to(a.device)).abs().flatten(1).mean(dim=1)


@torch.no_grad()
def nearest_neighbours(
    queries: Tensor,
    reference: Tensor,
    chunk_size: int = 1024,
    ref_chunk_size: int = 16384,
    normalized: bool = False,
) -> tuple[Tensor, Tensor]:
    """Exact nearest reference row of every query by cosine similarity: ``(max_sim, index)``, both ``(N,)``.

    Computed block by block with matrix products of ``chunk_size`` queries x ``ref_chunk_size``
    reference rows (never an N x M x D tensor; peak extra memory ~ ``chunk_size * ref_chunk_size``
    floats), keeping a running maximum.  Ties go to the lowest index.  ``normalized=True`` skips the
    re-normalisation of ``reference`` (for a bank that is already unit-norm).
    """
    _check_features(queries, "sample_feats")
    _check_features(reference, "reference_features")
    if queries.shape[1] != reference.shape[1]:
        raise ValueError(
            f"sample_feats has dimension {queries.shape[1]} but the reference features have {reference.shape[1]}; "
            "both must come from the same descriptor."
        )
    if reference.shape[0] == 0:
        raise ValueError("reference_features is empty; the training set needs at least one feature row.")
    chunk_size, ref_chunk_size = int(chunk_size), int(ref_chunk_size)
    if chunk_size < 1 or ref_chunk_size < 1:
        raise ValueError(
            f"chunk_size and ref_chunk_size must be positive, got {chunk_size} and {ref_chunk_size}."
        )
    dt = _float_dtype(queries, reference)
    ref = reference.to(dtype=dt)
    if not normalized:
        ref = F.normalize(ref, dim=1)
    q = F.normalize(queries.to(device=ref.device, dtype=dt), dim=1)
    n, m = q.shape[0], ref.shape[0]
    best = torch.empty(n, dtype=dt, device=ref.device)
    index = torch.empty(n, dtype=torch.long, device=ref.device)
    buf = torch.empty(min(chunk_size, n) * min(ref_chunk_size, m), dtype=dt, device=ref.device)
    for i in range(0, n, chunk_size):
        qi = q[i : i + chunk_size]
        bv = torch.full((qi.shape[0],), float("-inf"), dtype=dt, device=ref.device)
        bi = torch.zeros(qi.shape[0], dtype=torch.long, device=ref.device)
        for j in range(0, m, ref_chunk_size):
            rj = ref[j : j + ref_chunk_size]
            sims = torch.mm(qi, rj.T, out=buf[: qi.shape[0] * rj.shape[0]].view(qi.shape[0], rj.shape[0]))
            v, k = sims.max(dim=1)
            better = v > bv
            bv = torch.where(better, v, bv)
            bi = torch.where(better, k + j, bi)
        best[i : i + qi.shape[0]] = bv
        index[i : i + qi.shape[0]] = bi
    return best, index


# ----------------------------------------------------------------------------- metrics


class _SumMetric(Metric):
    """Common base: sum/count states, a cached summary computed from the synced states."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._summary: dict[str, Any] = {}

    def _count(self, name: str, shape: tuple[int, ...] = ()) -> None:
        self.add_state(name, default=torch.zeros(shape, dtype=torch.long), dist_reduce_fx="sum")

    def _total(self, name: str, shape: tuple[int, ...] = ()) -> None:
        self.add_state(name, default=torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")

    def summary(self) -> dict[str, Any]:
        """All the numbers of this metric as plain Python values (synced across ranks like ``compute()``;
        call it on every rank)."""
        self.compute()
        return {k: (v.tolist() if isinstance(v, Tensor) else v) for k, v in self._summary.items()}


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    den = den.to(torch.float64)
    return torch.where(den > 0, num.to(torch.float64) / den.clamp_min(1), torch.full_like(den, float("nan")))


class ReproducibilityScore(_SumMetric):
    """RP = fraction of seed-paired feature rows with cosine similarity ``> threshold`` (paper Sec. 2.1).

    ``update(feats_a, feats_b)`` with paired rows (row i of both from the same seed); ``compute()``
    returns RP as a float64 scalar tensor; ``summary()`` adds ``mean_similarity`` and ``num_pairs``.
    """

    def __init__(self, threshold: float = DEFAULT_SIM_THRESHOLD, **kwargs: Any):
        super().__init__(**kwargs)
        self.threshold = _check_threshold(threshold)
        self._count("num_above")
        self._count("num_pairs")
        self._total("similarity_sum")

    def update(self, feats_a: Tensor, feats_b: Tensor) -> None:
        sims = paired_similarity(feats_a, feats_b)
        self.num_above += (sims > self.threshold).sum().to(self.num_above)
        self.num_pairs += sims.numel()
        self.similarity_sum += sims.sum().to(self.similarity_sum)

    def compute(self) -> Tensor:
        rp = _ratio(self.num_above, self.num_pairs)
        self._summary = {
            "rp": rp,
            "mean_similarity": _ratio(self.similarity_sum, self.num_pairs),
            "num_pairs": self.num_pairs.clone(),
            "threshold": self.threshold,
        }
        return rp

    @property
    def mean_similarity(self) -> Tensor:
        """Mean paired cosine similarity (synced like ``compute()``)."""
        self.compute()
        return self._summary["mean_similarity"]


class MAEScore(_SumMetric):
    """MAE of seed-paired images in ``[0, 255]`` pixel levels.

    ``update(images_a, images_b)``: ``uint8`` ``[0, 255]`` or float ``[-1, 1]`` images of one shape.
    ``compute()`` -> ``{"mae_mean": mean per-pair MAE, "mae_score": fraction of pairs with MAE < threshold}``.
    Default threshold: ``DEFAULT_MAE_THRESHOLD`` (12.75 levels; see its comment for why).
    """

    higher_is_better = None

    def __init__(self, threshold: float = DEFAULT_MAE_THRESHOLD, **kwargs: Any):
        super().__init__(**kwargs)
        self.threshold = _check_mae_threshold(threshold)
        self._count("num_below")
        self._count("num_pairs")
        self._total("mae_sum")

    def update(self, images_a: Tensor, images_b: Tensor) -> None:
        mae = pairwise_mae(images_a, images_b)
        self.num_below += (mae < self.threshold).sum().to(self.num_below)
        self.num_pairs += mae.numel()
        self.mae_sum += mae.sum().to(self.mae_sum)

    def compute(self) -> dict[str, Tensor]:
        out = {
            "mae_mean": _ratio(self.mae_sum, self.num_pairs),
            "mae_score": _ratio(self.num_below, self.num_pairs),
        }
        self._summary = {**out, "num_pairs": self.num_pairs.clone(), "threshold": self.threshold}
        return out


class GeneralizationScore(_SumMetric):
    """GL = 1 - P( max_j cos(f(x), f(y_j)) > threshold ), ``{y_j}`` the training set (paper Sec. 2.1).

    Args:
        reference_features: ``(M, D)`` descriptor features of the model's training images.  Kept, unit-
            normalised, as the reference bank: a plain tensor attribute (like torchmetrics FID keeps its
            real features with ``reset_real_features=False``) that survives ``reset()``, follows
            ``.to()`` / ``.cuda()`` in device but keeps its dtype, is not synced across ranks (every rank
            holds the full bank and scores its own samples), not broadcast by DDP, not in ``state_dict``.
        threshold: similarity above which a sample counts as a copy of its nearest training image.
        chunk_size, ref_chunk_size: block sizes of the exact nearest-neighbour search.

    ``update(sample_feats)`` finds each sample's nearest training feature.  ``compute()`` returns
    **GL** (high = new images).  The complement, the **memorized fraction** (high = copies), is the
    property ``memorized_fraction``; ``summary()`` returns both, ``mean_max_similarity`` and
    ``num_samples``.  ``nearest(sample_feats) -> (max_sim, index)`` answers "which training image did
    it copy" without touching the states.
    """

    def __init__(
        self,
        reference_features: Tensor,
        threshold: float = DEFAULT_SIM_THRESHOLD,
        chunk_size: int = 1024,
        ref_chunk_size: int = 16384,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.threshold = _check_threshold(threshold)
        ref = _check_features(reference_features, "reference_features")
        if ref.shape[0] == 0:
            raise ValueError("reference_features is empty; the training set needs at least one feature row.")
        if int(chunk_size) < 1 or int(ref_chunk_size) < 1:
            raise ValueError(
                f"chunk_size and ref_chunk_size must be positive, got {chunk_size} and {ref_chunk_size}."
            )
        self.chunk_size, self.ref_chunk_size = int(chunk_size), int(ref_chunk_size)
        self.reference = F.normalize(ref.detach(), dim=1)
        self._count("num_memorized")
        self._count("num_samples")
        self._total("max_similarity_sum")

    def _apply(self, fn: Callable, exclude_state: Any = "") -> GeneralizationScore:
        this = super()._apply(fn, exclude_state)
        device = fn(torch.zeros(1, device=this.reference.device)).device
        this.reference = this.reference.to(device=device)
        return this

    def nearest(self, sample_feats: Tensor) -> tuple[Tensor, Tensor]:
        """Nearest training feature of each sample: ``(max_sim (N,), index (N,) int64)``."""
        return nearest_neighbours(
            sample_feats, self.reference, self.chunk_size, self.ref_chunk_size, normalized=True
        )

    def update(self, sample_feats: Tensor) -> None:
        best, _ = self.nearest(sample_feats)
        self.num_memorized += (best > self.threshold).sum().to(self.num_memorized)
        self.num_samples += best.numel()
        self.max_similarity_sum += best.sum().to(self.max_similarity_sum)

    def compute(self) -> Tensor:
        memorized = _ratio(self.num_memorized, self.num_samples)
        gl = _ratio(self.num_samples - self.num_memorized, self.num_samples)
        self._summary = {
            "gl": gl,
            "memorized_fraction": memorized,
            "mean_max_similarity": _ratio(self.max_similarity_sum, self.num_samples),
            "num_samples": self.num_samples.clone(),
            "threshold": self.threshold,
        }
        return gl

    @property
    def memorized_fraction(self) -> Tensor:
        """P(max_j sim > threshold) = 1 - GL (synced like ``compute()``; call it on every rank)."""
        self.compute()
        return self._summary["memorized_fraction"]

    @property
    def mean_max_similarity(self) -> Tensor:
        """Mean over samples of the similarity to their nearest training image."""
        self.compute()
        return self._summary["mean_max_similarity"]


class ConditionalReproducibilityScore(_SumMetric):
    """Per-class RP (paper Sec. 4.1) between two conditional models, or an unconditional and a conditional one.

    ``update(feats_a, feats_b, labels)``: paired rows and the class label of each pair (for the
    unconditional-vs-conditional comparison, the label the conditional model was sampled with).
    ``compute()`` -> ``{"per_class": (num_classes,) RP, NaN for classes with no pair; "overall": RP of
    all pairs; "counts": (num_classes,) pairs per class}``.
    """

    def __init__(self, num_classes: int, threshold: float = DEFAULT_SIM_THRESHOLD, **kwargs: Any):
        super().__init__(**kwargs)
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes}.")
        self.num_classes = int(num_classes)
        self.threshold = _check_threshold(threshold)
        k = (self.num_classes,)
        self._count("num_above", k)
        self._count("num_pairs", k)
        self._total("similarity_sum", k)

    def update(self, feats_a: Tensor, feats_b: Tensor, labels: Tensor) -> None:
        sims = paired_similarity(feats_a, feats_b)
        labels = torch.as_tensor(labels, device=sims.device)
        if labels.ndim != 1 or labels.shape[0] != sims.shape[0] or labels.is_floating_point():
            raise ValueError(
                f"labels must be an integer tensor of shape ({sims.shape[0]},), one class per pair, "
                f"got {labels.dtype} {tuple(labels.shape)}."
            )
        labels = labels.long()
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"labels must lie in [0, {self.num_classes - 1}], got values in "
                f"[{int(labels.min())}, {int(labels.max())}]."
            )
        k, dev = self.num_classes, sims.device
        above = torch.zeros(k, dtype=torch.long, device=dev).index_add_(
            0, labels, (sims > self.threshold).long()
        )
        self.num_above += above.to(self.num_above)
        self.num_pairs += torch.bincount(labels, minlength=k).to(self.num_pairs)
        sim_sum = torch.zeros(k, dtype=torch.float64, device=dev).index_add_(
            0, labels, sims.to(torch.float64)
        )
        self.similarity_sum += sim_sum.to(self.similarity_sum)

    def compute(self) -> dict[str, Tensor]:
        out = {
            "per_class": _ratio(self.num_above, self.num_pairs),
            "overall": _ratio(self.num_above.sum(), self.num_pairs.sum()),
            "counts": self.num_pairs.clone(),
        }
        self._summary = {
            **out,
            "mean_similarity_per_class": _ratio(self.similarity_sum, self.num_pairs),
            "threshold": self.threshold,
        }
        return out


# ----------------------------------------------------------------------------- functional twins


def rp_score(feats_a: Tensor, feats_b: Tensor, threshold: float = DEFAULT_SIM_THRESHOLD) -> float:
    """RP = fraction of row pairs with cosine similarity ``> threshold``."""
    t = _check_threshold(threshold)
    sims = paired_similarity(feats_a, feats_b)
    if sims.numel() == 0:
        return float("nan")
    return int((sims > t).sum()) / sims.numel()


def mae_score(
    images_a: Tensor, images_b: Tensor, threshold: float = DEFAULT_MAE_THRESHOLD
) -> dict[str, float]:
    """``{"mae_mean", "mae_score"}`` of paired images (see ``MAEScore``)."""
    t = _check_mae_threshold(threshold)
    mae = pairwise_mae(images_a, images_b)
    if mae.numel() == 0:
        return {"mae_mean": float("nan"), "mae_score": float("nan")}
    return {"mae_mean": float(mae.mean()), "mae_score": int((mae < t).sum()) / mae.numel()}


def gl_score(
    sample_feats: Tensor,
    reference_feats: Tensor,
    threshold: float = DEFAULT_SIM_THRESHOLD,
    chunk_size: int = 1024,
) -> float:
    """GL = 1 - fraction of samples whose nearest reference feature has similarity ``> threshold``."""
    t = _check_threshold(threshold)
    best, _ = nearest_neighbours(sample_feats, reference_feats, chunk_size=chunk_size)
    if best.numel() == 0:
        return float("nan")
    return int((best <= t).sum()) / best.numel()
