"""Mixture of low-rank Gaussians and its closed-form score (Zhang et al. 2024, Eq. 2 and Prop. 2).

The data distribution (Eq. 2) is a mixture of K zero-mean Gaussians, each supported on a d-dimensional
subspace of R^n with an orthonormal basis ``U_k`` (n x d):

    x_0 ~ sum_k pi_k N(0, c^2 U_k U_k^T),        c = ``scale``.

Adding noise, ``x = x_0 + sigma n`` has density ``p_sigma(x) = sum_k pi_k N(x; 0, C_k)`` with
``C_k = c^2 U_k U_k^T + sigma^2 I``.  By Woodbury, for orthonormal ``U_k``,

    C_k^{-1} = (I - c^2 / (c^2 + sigma^2) U_k U_k^T) / sigma^2,
    log det C_k = n log sigma^2 + d log(1 + c^2 / sigma^2),

so the score (Prop. 2) is ``grad log p_sigma(x) = -sum_k w_k(x) C_k^{-1} x`` with posterior weights
``w_k(x) = softmax_k(log pi_k + log N(x; 0, C_k))``, and the optimal denoiser (Tweedie) is

    D*(x; sigma) = x + sigma^2 grad log p_sigma(x) = c^2 / (c^2 + sigma^2) sum_k w_k(x) U_k U_k^T x.

The bases are the Q factors of the QR decomposition of seeded Gaussian n x d matrices, so a
``LowRankMoG`` is a pure function of ``(n, K, d, weights, seed, scale)``.

Scale.  The average diagonal entry of ``U_k U_k^T`` is ``d / n``, so the per-coordinate (per-pixel)
standard deviation of ``x_0`` is ``c sqrt(d / n)`` on average.  The default ``scale=None`` picks
``c = 0.5 sqrt(n / d)``: a per-pixel std of 0.5, about that of natural images in [-1, 1] (CIFAR-10: ~0.5),
so MoG "images" sit on the suite's [-1, 1] scale.  ``scale=1.0`` is the paper's Eq. 2 exactly.

``score_error`` estimates the score approximation error of Sec. 3.2.1,
``E_{sigma, x_0, n} || s_theta(x_0 + sigma n, sigma) - grad log p_sigma(x_0 + sigma n) ||^2``, where the
score of a Denoiser is ``s_theta(x, sigma) = (D(x, sigma) - x) / sigma^2``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["LowRankMoG", "score_error"]

# EDM training-noise distribution (Karras et al. 2022, Table 1): ln(sigma) ~ N(P_mean, P_std^2).
EDM_P_MEAN = -1.2
EDM_P_STD = 1.2


class LowRankMoG:
    """Mixture of K zero-mean Gaussians on random d-dimensional subspaces of R^n (paper Eq. 2).

    Args:
        n: ambient dimension, or an image shape ``(C, H, W)`` (then n = C*H*W and samples have that shape).
        K: number of components.
        d: rank of every component (1 <= d <= n).
        weights: mixing weights pi_k (K non-negative numbers; normalised); default uniform.
        seed: seed of the bases ``U_k`` (QR of a seeded Gaussian n x d matrix per component).
        scale: ``c`` in ``Cov_k = c^2 U_k U_k^T``; ``None`` (default) gives ``0.5 sqrt(n / d)``, i.e. a
            per-pixel std of 0.5 (see the module docstring); ``1.0`` is the paper's Eq. 2.
        device: where the bases live (float64).

    It is a ``Denoiser``: ``mog(x, sigma, labels=None)`` is the exact posterior mean; ``labels`` (B,)
    with values in 0..K-1 condition on a component (-1 = the whole mixture).
    """

    def __init__(
        self,
        n: int | Sequence[int],
        K: int,
        d: int,
        weights: Sequence[float] | Tensor | None = None,
        seed: int = 0,
        scale: float | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if isinstance(n, int):
            shape: tuple[int, ...] = (n,)
        else:
            shape = tuple(int(v) for v in n)
        if not shape or any(v < 1 for v in shape):
            raise ValueError(f"n must be a positive int or an image shape (C, H, W), got {n!r}.")
        dim = math.prod(shape)
        if not isinstance(K, int) or K < 1:
            raise ValueError(f"K (number of components) must be an integer >= 1, got {K!r}.")
        if not isinstance(d, int) or not 1 <= d <= dim:
            raise ValueError(f"d (rank) must be an integer in [1, n={dim}], got {d!r}.")
        if scale is None:
            scale = 0.5 * math.sqrt(dim / d)
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive finite number, got {scale!r}.")
        device = torch.device(device) if device is not None else torch.device("cpu")

        if weights is None:
            w = torch.full((K,), 1.0 / K, dtype=torch.float64)
        else:
            w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
            if (
                w.numel() != K
                or not bool(torch.isfinite(w).all())
                or bool((w < 0).any())
                or float(w.sum()) <= 0
            ):
                raise ValueError(
                    f"weights must be {K} non-negative numbers with a positive sum, got {weights!r}."
                )
            w = w / w.sum()

        g = torch.Generator().manual_seed(int(seed))
        a = torch.randn(K, dim, d, generator=g, dtype=torch.float64)
        q, r = torch.linalg.qr(a)  # reduced QR per component: q is (K, n, d) with orthonormal columns
        # Fix the sign convention (positive diag(R)) so the basis does not depend on the LAPACK build.
        sign = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
        sign[sign == 0] = 1
        self.U = (q * sign.unsqueeze(1)).to(device)
        self.weights = w.to(device)
        self.shape = shape
        self.n = dim
        self.K = K
        self.d = d
        self.seed = int(seed)
        self.scale = float(scale)
        self.device = device

    def __repr__(self) -> str:
        return f"LowRankMoG(shape={self.shape}, K={self.K}, d={self.d}, seed={self.seed}, scale={self.scale:.4g})"

    # -- sampling ------------------------------------------------------------------------------
    def sample(
        self,
        num: int,
        generator: torch.Generator | None = None,
        return_components: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``num`` draws of ``x_0``, shape (num, *shape) in ``dtype`` (computed in float64).

        Component ``k ~ Categorical(pi)``, then ``x_0 = c U_k a`` with ``a ~ N(0, I_d)``; all draws come
        from ``generator`` (a CPU generator; torch's global RNG when None).  With ``return_components``
        also returns the (num,) int64 component indices.
        """
        if not isinstance(num, int) or num < 0:
            raise ValueError(f"num must be an integer >= 0, got {num!r}.")
        if num == 0:
            k = torch.zeros(0, dtype=torch.int64)
        else:
            k = torch.multinomial(self.weights.cpu(), num, replacement=True, generator=generator)
        a = torch.randn(num, self.d, generator=generator, dtype=torch.float64)
        k, a = k.to(self.device), a.to(self.device)
        x = self.scale * torch.einsum("bnd,bd->bn", self.U[k], a)
        x = x.reshape(num, *self.shape).to(dtype)
        return (x, k) if return_components else x

    # -- closed forms --------------------------------------------------------------------------
    def _prep(self, x: Tensor, sigma: Tensor | float, allow_zero: bool = False) -> tuple[Tensor, Tensor]:
        if not isinstance(x, Tensor) or x.ndim != len(self.shape) + 1 or tuple(x.shape[1:]) != self.shape:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (B, {', '.join(map(str, self.shape))}), got {got}.")
        b = x.shape[0]
        s = sigma if isinstance(sigma, Tensor) else torch.as_tensor(sigma, dtype=torch.float64)
        s = s.to(device=self.device, dtype=torch.float64).reshape(-1)
        if s.numel() == 1:
            s = s.expand(b)
        if s.numel() != b:
            raise ValueError(f"sigma has {s.numel()} values for a batch of {b} samples.")
        if (
            not bool(torch.isfinite(s).all())
            or bool((s < 0).any())
            or (not allow_zero and bool((s == 0).any()))
        ):
            raise ValueError(f"sigma must be finite and {'>= 0' if allow_zero else '> 0'}.")
        return x.reshape(b, self.n).to(device=self.device, dtype=torch.float64), s

    def _posterior(self, xf: Tensor, s: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Per-component ``log pi_k + log N(x; 0, C_k)`` (B, K), projections ``U_k^T x`` (B, K, d) and
        squared residuals ``||x - U_k U_k^T x||^2`` (B, K), all without cancellation-prone differences."""
        c2 = self.scale**2
        s2 = (s * s).unsqueeze(1)  # (B, 1)
        proj = torch.einsum("bn,knd->bkd", xf, self.U)
        p2 = (proj * proj).sum(-1)
        resid2 = torch.stack(
            [((xf - proj[:, k] @ self.U[k].T) ** 2).sum(1) for k in range(self.K)], 1
        )  # computed directly: ||x||^2 - ||U^T x||^2 would cancel for x near a subspace
        quad = resid2 / s2 + p2 / (c2 + s2)  # x^T C_k^{-1} x
        logdet = self.n * torch.log(s2) + self.d * torch.log1p(c2 / s2)
        logits = torch.log(self.weights) - 0.5 * (self.n * math.log(2 * math.pi) + logdet + quad)
        if labels is not None:
            labels = torch.as_tensor(labels, device=self.device).reshape(-1)
            if labels.numel() == 1:
                labels = labels.expand(xf.shape[0])
            if labels.numel() != xf.shape[0] or labels.is_floating_point() or bool((labels >= self.K).any()):
                raise ValueError(
                    f"labels must be {xf.shape[0]} integers in [-1, {self.K - 1}] (component index, -1 = none)."
                )
            comp = torch.arange(self.K, device=self.device)
            keep = (labels.unsqueeze(1) < 0) | (labels.unsqueeze(1) == comp)
            logits = logits.masked_fill(~keep, -math.inf)
        return logits, proj, resid2

    def log_prob(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None) -> Tensor:
        """``log p_sigma(x) = log sum_k pi_k N(x; 0, c^2 U_k U_k^T + sigma^2 I)``, float64 (B,); differentiable.

        With ``labels`` (component indices, -1 = none) it is the log-density of the chosen component
        including ``log pi_k``.
        """
        xf, s = self._prep(x, sigma)
        logits, _, _ = self._posterior(xf, s, labels)
        return torch.logsumexp(logits, 1)

    def score(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None) -> Tensor:
        """Closed-form ``grad log p_sigma(x) = -sum_k w_k C_k^{-1} x`` (Prop. 2; Woodbury), float64, x's shape."""
        xf, s = self._prep(x, sigma)
        logits, proj, _ = self._posterior(xf, s, labels)
        w = torch.softmax(logits, 1)  # (B, K)
        s2 = (s * s).unsqueeze(1)
        # C_k^{-1} x = (x - U_k U_k^T x) / s^2 + U_k U_k^T x / (c^2 + s^2): the residual form avoids cancellation.
        on = torch.einsum("bk,bkd,knd->bn", w, proj, self.U)  # sum_k w_k U_k U_k^T x
        sc = -(xf - on) / s2 - on / (self.scale**2 + s2)
        return sc.reshape(x.shape)

    @torch.no_grad()
    def denoise(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None) -> Tensor:
        """Posterior mean ``E[x_0 | x] = x + sigma^2 score = c^2/(c^2+sigma^2) sum_k w_k U_k U_k^T x``.

        Returns x's dtype and device.  At ``sigma = 0`` it is the projection onto the most likely
        subspace (smallest residual, ties by weight), the limit of the posterior mean.
        """
        xf, s = self._prep(x, sigma, allow_zero=True)
        zero = s == 0
        s_safe = torch.where(zero, torch.ones_like(s), s)
        logits, proj, resid2 = self._posterior(xf, s_safe, labels)
        w = torch.softmax(logits, 1)
        if bool(zero.any()):
            lim = torch.where(torch.isfinite(logits), -resid2, torch.full_like(resid2, -math.inf))
            lim = lim + 1e-12 * torch.log(self.weights)  # tie-break by weight
            hard = torch.nn.functional.one_hot(lim.argmax(1), self.K).to(w.dtype)
            w = torch.where(zero.unsqueeze(1), hard, w)
        c2 = self.scale**2
        shrink = torch.where(zero, torch.ones_like(s), c2 / (c2 + s * s)).unsqueeze(1)
        out = shrink * torch.einsum("bk,bkd,knd->bn", w, proj, self.U)
        return out.reshape(x.shape).to(device=x.device, dtype=x.dtype)

    def __call__(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None) -> Tensor:
        return self.denoise(x, sigma, labels)


def _sigma_draws(
    sigmas: Sequence[float] | Tensor | None, num_samples: int, generator: torch.Generator | None
) -> Tensor:
    if sigmas is None:
        z = torch.randn(num_samples, generator=generator, dtype=torch.float64)
        return torch.exp(EDM_P_MEAN + EDM_P_STD * z)
    grid = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)
    if grid.numel() == 0 or not bool(torch.isfinite(grid).all()) or bool((grid <= 0).any()):
        raise ValueError("sigmas must be a non-empty list of positive finite noise levels (or None).")
    return grid.repeat_interleave(num_samples)


@torch.no_grad()
def score_error(
    denoiser,
    mog: LowRankMoG,
    num_samples: int = 1024,
    sigmas: Sequence[float] | Tensor | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 512,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> float:
    """Score approximation error ``E_{sigma, x_0, n} ||s_theta(x, sigma) - grad log p_sigma(x)||^2`` (Sec. 3.2.1).

    ``x = x_0 + sigma n`` with ``x_0 ~ mog`` and ``n ~ N(0, I)``; the score of the Denoiser is
    ``s_theta(x, sigma) = (D(x, sigma) - x) / sigma^2``; the squared norm is summed over all n coordinates
    and averaged over draws.

    Noise levels averaged over:
      * ``sigmas=None``: ``num_samples`` draws with ``ln sigma ~ N(-1.2, 1.2^2)``, the EDM training
        distribution (Karras et al. 2022), one sigma per draw;
      * ``sigmas=[...]``: a fixed list, ``num_samples`` draws *per* listed sigma, averaged uniformly over
        the list.
    Note that the unweighted error grows like ``1/sigma^2`` for a fixed denoiser error, so small sigmas
    dominate the average.

    ``x`` is handed to the denoiser in ``dtype`` on ``device`` (default: the MoG's device); the true score
    is evaluated (float64) at that same rounded ``x``.  All draws come from ``generator`` (CPU).
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
    device = torch.device(device) if device is not None else mog.device
    sig_all = _sigma_draws(sigmas, num_samples, generator)
    total, count = 0.0, 0
    for i in range(0, sig_all.numel(), batch_size):
        sig = sig_all[i : i + batch_size].to(dtype).double()  # the sigma the denoiser actually sees
        b = sig.numel()
        x0 = mog.sample(b, generator=generator, dtype=torch.float64)
        noise = torch.randn(b, *mog.shape, generator=generator, dtype=torch.float64)
        sb = sig.reshape(-1, *([1] * len(mog.shape)))
        x_in = (x0.to(noise.device) + sb * noise).to(device=device, dtype=dtype)
        x = x_in.to(device=mog.device, dtype=torch.float64)
        s_true = mog.score(x, sig)
        d = denoiser(x_in, sig.to(device=device, dtype=dtype)).to(device=mog.device, dtype=torch.float64)
        s_model = (d - x) / (sb.to(mog.device) ** 2)
        total += float(((s_model - s_true) ** 2).reshape(b, -1).sum(1).sum())
        count += b
    return total / count
