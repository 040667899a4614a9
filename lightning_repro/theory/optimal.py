"""The optimal denoiser of the empirical distribution (Zhang et al. 2024, Prop. 1).

For a training set ``{y_1, ..., y_N}`` the empirical (multi-delta) distribution smoothed by Gaussian noise,
``p_sigma(x) = (1/N) sum_i N(x; y_i, sigma^2 I)``, has the minimiser of the denoising loss
``E || D(y + sigma n; sigma) - y ||^2`` in closed form (Prop. 1; also Karras et al. 2022, Eq. 57):

    D*(x; sigma) = sum_i softmax_i( -||x - y_i||^2 / (2 sigma^2) ) y_i  =  x + sigma^2 grad log p_sigma(x).

``EmpiricalOptimalDenoiser`` evaluates it exactly, streaming over the training set in chunks with an
*online* log-sum-exp (Milakov & Gimelshein 2018, "Online normalizer calculation for softmax"): one pass
keeps a running maximum ``m`` of the logits, the running sum ``s`` of ``exp(logit - m)`` and the running
weighted sum ``a`` of the images, and rescales ``s`` and ``a`` by ``exp(m_old - m_new)`` whenever the
maximum grows.  Memory is O(batch x chunk), never O(batch x N x D); nothing overflows or divides 0 by 0
at small ``sigma``; accumulation is in float64 by default.

Numerics.  The logit of image ``i`` is ``(x . y_i - ||y_i||^2 / 2) / sigma^2``; the term ``||x||^2`` is
the same for every ``i`` and cancels in the softmax, so it is never formed, and the dot products of a
chunk are one matrix product.  Images and queries are centred on the training mean first (distances are
translation invariant), which shrinks the magnitudes entering the dot products and thus the rounding
error at small ``sigma``.  Weights below ``exp(-650)`` of the running maximum are set to exactly 0 (a
relative change < 1e-280) so that no subnormal numbers slow the CPU down.  ``sigma = 0`` (in float64, any
``sigma`` below ~1e-154, where the logits could overflow) returns the nearest training image, the limit;
``sigma = inf`` returns the training mean.

Class-conditional variant.  Built with training ``labels``, ``D(x, sigma, labels)`` restricts the sum to
the training images of each sample's class (a label of -1 means unconditional: the whole set).  The
training set is stored sorted by class, so each class is a contiguous slice.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["EmpiricalOptimalDenoiser"]


def _sigma64(sigma: Tensor | float, batch: int, device: torch.device) -> Tensor:
    """``sigma`` (scalar, (B,) or (B,1,1,1)) as a float64 (B,) tensor; checks it is >= 0 and not NaN."""
    s = sigma.detach() if isinstance(sigma, Tensor) else torch.as_tensor(sigma, dtype=torch.float64)
    s = s.to(device=device, dtype=torch.float64).reshape(-1)
    if s.numel() == 1:
        s = s.expand(batch)
    if s.numel() != batch:
        raise ValueError(f"sigma has {s.numel()} values for a batch of {batch} images.")
    if bool(torch.isnan(s).any()) or bool((s < 0).any()):
        raise ValueError("sigma must be >= 0 (inf allowed), got a negative or NaN value.")
    return s


# exp(t) for t < _CUT is set to exactly 0: exp(-650) ~ 5e-283 is negligible next to the largest weight (1),
# and it keeps weights (and their products with pixel values) out of the subnormal range, where CPU
# arithmetic is ~100x slower.
_CUT = -650.0


def _exp_cut(t: Tensor) -> Tensor:
    """In-place ``exp(t)`` with ``exp(t) = 0`` for ``t < _CUT`` (no subnormal weights)."""
    return t.masked_fill_(t < _CUT, -math.inf).exp_()


class EmpiricalOptimalDenoiser:
    """The optimal (minimum-loss) denoiser of the empirical distribution of ``train_images`` (Prop. 1).

    Args:
        train_images: (N, C, H, W) (or (N, *shape)) float images, in [-1, 1] inside the suite.
        labels: optional (N,) non-negative integer class labels, enabling the class-conditional variant.
        chunk_size: training images per streamed chunk (memory is O(batch x chunk_size)); default 512 on
            CPU (fastest in ``benchmarks/optimal.py``), 8192 on GPU.
        dtype: accumulation dtype (float64 by default; the output has the dtype of the input ``x``).
        device: where the training set lives and the computation runs (default: ``train_images.device``).

    Call as a ``Denoiser``: ``D(x, sigma, labels=None) -> x0_hat`` with ``x`` of shape (B, *shape).
    """

    def __init__(
        self,
        train_images: Tensor,
        labels: Tensor | None = None,
        chunk_size: int | None = None,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> None:
        if not isinstance(train_images, Tensor) or train_images.ndim < 2 or train_images.shape[0] < 1:
            raise ValueError("train_images must be a tensor of shape (N, C, H, W) with N >= 1.")
        if not train_images.is_floating_point():
            raise ValueError(
                f"train_images must be a float tensor in [-1, 1], got dtype {train_images.dtype}."
            )
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}.")
        device = torch.device(device) if device is not None else train_images.device
        if chunk_size is None:  # tuned with benchmarks/optimal.py (CPU); GPUs prefer larger matrix products
            chunk_size = 512 if device.type == "cpu" else 8192
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}.")
        n = train_images.shape[0]
        y = train_images.detach().reshape(n, -1).to(device=device, dtype=dtype)
        if not bool(torch.isfinite(y).all()):
            raise ValueError("train_images contains NaN or Inf values.")

        self.shape = tuple(train_images.shape[1:])
        self.dim = y.shape[1]
        self.num_images = n
        self.chunk_size = chunk_size
        self.dtype = dtype
        self.device = device

        # Sort by class so that every class is one contiguous slice; ``_order`` maps back to input indices.
        self.num_classes = 0
        self._class_slices: dict[int, tuple[int, int]] = {}
        order = torch.arange(n, device=device)
        if labels is not None:
            labels = torch.as_tensor(labels).reshape(-1)
            if labels.numel() != n or labels.is_floating_point() or labels.is_complex():
                raise ValueError(f"labels must be an integer tensor of shape ({n},), one per training image.")
            labels = labels.to(device=device, dtype=torch.int64)
            if bool((labels < 0).any()):
                raise ValueError("labels of training images must be >= 0.")
            labels, order = torch.sort(labels, stable=True)
            y = y[order]
            classes, counts = torch.unique_consecutive(labels, return_counts=True)
            start = 0
            for c, k in zip(classes.tolist(), counts.tolist()):
                self._class_slices[int(c)] = (start, start + k)
                start += k
            self.num_classes = int(classes.max()) + 1
        self.train_labels = labels
        self._order = order

        self.mean = y.mean(0)
        self._y = y - self.mean  # centred training images, (N, D)
        # ||y_i - mean||^2 / 2, (N,), in pieces so that no second N x D temporary is allocated
        self._half_sq = torch.cat([0.5 * (c * c).sum(1) for c in self._y.split(8192)])

    # ------------------------------------------------------------------------------------------
    @property
    def train_images(self) -> Tensor:
        """The training images in their input order, (N, *shape), in the accumulation dtype."""
        y = torch.empty_like(self._y)
        y[self._order] = self._y + self.mean
        return y.reshape(self.num_images, *self.shape)

    def __repr__(self) -> str:
        return (
            f"EmpiricalOptimalDenoiser(num_images={self.num_images}, shape={self.shape}, "
            f"num_classes={self.num_classes}, chunk_size={self.chunk_size}, dtype={self.dtype})"
        )

    def _flatten(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or tuple(x.shape[1:]) != self.shape or x.ndim != len(self.shape) + 1:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (B, {', '.join(map(str, self.shape))}), got {got}.")
        return x.reshape(x.shape[0], -1).to(device=self.device, dtype=self.dtype) - self.mean

    def _groups(self, labels: Tensor | None, batch: int) -> list[tuple[Tensor | None, int, int]]:
        """Split the batch by label: ``[(rows or None for all, start, end)]`` slices of the training set."""
        full = [(None, 0, self.num_images)]
        if labels is None:
            return full
        labels = torch.as_tensor(labels).reshape(-1)
        if labels.numel() == 1:
            labels = labels.expand(batch)
        if labels.numel() != batch or labels.is_floating_point():
            raise ValueError(
                f"labels must be an integer tensor of shape ({batch},) (one per sample, -1 = none)."
            )
        labels = labels.to(self.device, torch.int64)
        if bool((labels < 0).all()):
            return full
        if self.train_labels is None:
            raise ValueError(
                "labels were given but this EmpiricalOptimalDenoiser was built without training labels."
            )
        groups = []
        for c in torch.unique(labels).tolist():
            rows = (labels == c).nonzero().squeeze(1)
            if c < 0:
                groups.append((rows, 0, self.num_images))
            elif c in self._class_slices:
                groups.append((rows, *self._class_slices[c]))
            else:
                raise ValueError(
                    f"label {c} has no training images (classes present: {sorted(self._class_slices)})."
                )
        return groups

    # ------------------------------------------------------------------------------------------
    def _online_lse(self, xc: Tensor, inv_s2: Tensor, start: int, end: int) -> tuple[Tensor, Tensor, Tensor]:
        """One streamed pass over training images ``start:end``.

        Returns the running max ``m`` (B,), normaliser ``s = sum_i exp(l_i - m)`` (B,) and weighted sum
        ``a = sum_i exp(l_i - m) (y_i - mean)`` (B, D) of the logits ``l_i = (x.y_i - |y_i|^2/2) / sigma^2``.
        """
        b = xc.shape[0]
        m = xc.new_full((b,), -math.inf)
        s = xc.new_zeros(b)
        a = xc.new_zeros(b, self.dim)
        inv = inv_s2.unsqueeze(1)
        for i in range(start, end, self.chunk_size):
            j = min(i + self.chunk_size, end)
            yc = self._y[i:j]
            logits = torch.addmm(self._half_sq[i:j], xc, yc.T, beta=-1.0).mul_(inv)  # (B, n): one GEMM
            m_new = torch.maximum(m, logits.amax(1))
            alpha = _exp_cut(m - m_new)  # rescales what was accumulated under the old maximum
            w = _exp_cut(logits.sub_(m_new.unsqueeze(1)))
            s = torch.addcmul(w.sum(1), s, alpha)
            a.mul_(alpha.unsqueeze(1))
            a.addmm_(w, yc)  # second GEMM, on the same (still cached) chunk
            m = m_new
        return m, s, a

    def _nearest_centred(self, xc: Tensor, start: int, end: int) -> Tensor:
        """Index (into the sorted set) of the nearest training image in ``start:end``: argmax of x.y - |y|^2/2."""
        best = xc.new_full((xc.shape[0],), -math.inf)
        idx = torch.zeros(xc.shape[0], dtype=torch.int64, device=xc.device)
        for i in range(start, end, self.chunk_size):
            j = min(i + self.chunk_size, end)
            score = torch.addmm(self._half_sq[i:j], xc, self._y[i:j].T, beta=-1.0)
            v, k = score.max(1)
            better = v > best
            best = torch.where(better, v, best)
            idx = torch.where(better, k + i, idx)
        return idx

    def __call__(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None) -> Tensor:
        """``D*(x; sigma) = sum_i softmax_i(-||x - y_i||^2 / (2 sigma^2)) y_i`` (Prop. 1), per sample.

        Differentiable in ``x`` when ``x`` requires grad and grad mode is on (e.g. for DPS, ``sampling.dps``):
        then it is evaluated by ``_differentiable_call`` (a plain softmax, O(batch x N) memory); otherwise by
        the streamed, gradient-free pass.
        """
        if torch.is_grad_enabled() and isinstance(x, Tensor) and x.requires_grad:
            return self._differentiable_call(x, sigma, labels)
        with torch.no_grad():
            return self._streamed_call(x, sigma, labels)

    def _differentiable_call(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None) -> Tensor:
        """Same value as the streamed pass, as one autograd graph: ``softmax(logits) @ y`` per label group.

        ``sigma`` is treated as a constant (no gradient); ``sigma = 0`` rows get the nearest training image
        (zero gradient), the limit.
        """
        xc = self._flatten(x)
        b = xc.shape[0]
        sig = _sigma64(sigma, b, self.device)
        inv_s2 = (1.0 / (sig * sig)).to(self.dtype)
        zero = inv_s2 > math.sqrt(torch.finfo(self.dtype).max)
        inv_s2 = torch.where(zero, torch.zeros_like(inv_s2), inv_s2)
        parts, index = [], []
        for rows, start, end in self._groups(labels, b):
            xg = xc if rows is None else xc[rows]
            yg = self._y[start:end]
            logits = (xg @ yg.T - self._half_sq[start:end]) * (inv_s2 if rows is None else inv_s2[rows]).unsqueeze(1)
            res = torch.softmax(logits, dim=1) @ yg
            zg = zero if rows is None else zero[rows]
            if bool(zg.any()):
                near = self._y[self._nearest_centred(xg.detach(), start, end)]
                res = torch.where(zg.unsqueeze(1), near, res)
            parts.append(res)
            index.append(torch.arange(b, device=self.device) if rows is None else rows)
        out = torch.cat(parts)[torch.argsort(torch.cat(index))]
        return (out + self.mean).reshape(x.shape).to(device=x.device, dtype=x.dtype)

    def _streamed_call(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None) -> Tensor:
        xc = self._flatten(x)
        b = xc.shape[0]
        sig = _sigma64(sigma, b, self.device)
        inv_s2 = (1.0 / (sig * sig)).to(self.dtype)
        out = torch.empty_like(xc)
        for rows, start, end in self._groups(labels, b):
            xg = xc if rows is None else xc[rows]
            ig = inv_s2 if rows is None else inv_s2[rows]
            # sigma == 0 (or so small that the logits could overflow): the limit is the nearest image
            zero = ig > math.sqrt(torch.finfo(self.dtype).max)
            _, s, a = self._online_lse(xg, torch.where(zero, torch.zeros_like(ig), ig), start, end)
            res = a / s.unsqueeze(1)
            if bool(zero.any()):
                res[zero] = self._y[self._nearest_centred(xg[zero], start, end)]
            if rows is None:
                out = res
            else:
                out[rows] = res
        return (out + self.mean).reshape(x.shape).to(device=x.device, dtype=x.dtype)

    def log_density(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None) -> Tensor:
        """``log p_sigma(x) = log (1/N) sum_i N(x; y_i, sigma^2 I)`` (exact, with its constant), shape (B,).

        Differentiable in ``x`` (autograd): ``x + sigma^2 * grad log p_sigma(x)`` equals ``D(x, sigma)``.
        With ``labels`` the sum runs over the images of each sample's class (N = that class's size).
        """
        if not isinstance(x, Tensor):
            raise ValueError("x must be a tensor of shape (B, *shape).")
        xc = self._flatten(x)
        b = xc.shape[0]
        sig = _sigma64(sigma, b, self.device).to(self.dtype)
        if bool((sig == 0).any()):
            raise ValueError("log_density needs sigma > 0.")
        inv_s2 = 1.0 / (sig * sig)
        out = xc.new_zeros(b)
        for rows, start, end in self._groups(labels, b):
            xg = xc if rows is None else xc[rows]
            ig = inv_s2 if rows is None else inv_s2[rows]
            parts = []
            for i in range(start, end, self.chunk_size):
                j = min(i + self.chunk_size, end)
                logits = (xg @ self._y[i:j].T - self._half_sq[i:j]) * ig.unsqueeze(1)
                parts.append(torch.logsumexp(logits, 1))
            lse = torch.logsumexp(torch.stack(parts, 1), 1)
            sg = sig if rows is None else sig[rows]
            val = (
                lse
                - 0.5 * (xg * xg).sum(1) * ig
                - math.log(end - start)
                - 0.5 * self.dim * torch.log(2 * math.pi * sg * sg)
            )
            out = val if rows is None else out.index_put((rows,), val)
        return out

    @torch.no_grad()
    def nearest(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """Index (into ``train_images`` as given) of the nearest training image (L2) of each sample, (B,)."""
        xc = self._flatten(x)
        idx = torch.empty(xc.shape[0], dtype=torch.int64, device=self.device)
        for rows, start, end in self._groups(labels, xc.shape[0]):
            if rows is None:
                idx = self._nearest_centred(xc, start, end)
            else:
                idx[rows] = self._nearest_centred(xc[rows], start, end)
        return self._order[idx].to(x.device)
