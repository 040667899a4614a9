"""Deterministic samplers: the probability-flow ODE in the EDM variable on a descending sigma grid.

Every sampler integrates (Karras et al. 2022, Eq. 4 with ``s(t) = 1``, ``sigma(t) = t``)

    dx / dsigma = (x - D(x, sigma)) / sigma,

from ``x_T`` (already scaled by the caller, e.g. ``sigma_max * z``) along ``sigmas`` (descending, usually
ending in 0, see ``grids.get_sigmas``) and returns ``x_0``.  Signature of each:
``(denoiser, x_T, sigmas, labels=None, **opts) -> x_0``.

* ``sample_euler``  Euler in sigma, written as ``x' = D + (sigma'/sigma) (x - D)``.  This *is* DDIM
                    (Song, Meng & Ermon 2021, eta = 0) for any VP kernel: DDIM's update divided by
                    ``s(t)`` is exactly this step in the EDM variable (Karras et al. 2022, App. B.2).
* ``sample_heun``   EDM Algorithm 1, deterministic (S_churn = 0): Heun's 2nd-order correction on every
                    step except the last one into sigma = 0; N steps cost ``2N - 1`` evaluations.
* ``sample_dpmpp``  DPM-Solver++ multistep (Lu et al. 2022b, Alg. 2; data prediction) of order 1-3 in
                    ``lambda = -log sigma`` (alpha = 1 in the EDM variable).  Order 1 is DDIM/Euler exactly.
                    The first steps warm up with lower orders; with ``lower_order_final`` and fewer
                    than 15 steps the last steps drop to lower order (dpm-solver's rule by default,
                    diffusers' with ``lower_order_final="diffusers"``; see ``sample_dpmpp``).  A final step
                    into sigma = 0 returns the last denoised ``D(x, sigma_{N-1})`` (DPM-Solver's
                    "denoise_to_zero"), so N steps cost N evaluations.
* ``sample_ode``    torchdiffeq ``odeint`` (adaptive dopri5, rtol = atol = 1e-5) of the same ODE in the
                    variable ``lambda = -log sigma`` (``dx/dlambda = D(x, sigma) - x``; the dynamics are
                    spread evenly over noise scales), from ``sigmas[0]`` to the smallest non-zero sigma,
                    then ``x_0 = D(x, sigma_min)``.  Each sample is solved on its own (``per_sample=True``)
                    so adaptive step sizes are not shared across a batch: a sample's result does not
                    depend on its batch-mates.

A grid whose last value is non-zero is integrated up to that value (no final denoise).

Options every sampler takes
---------------------------
``guidance``  classifier-free guidance weight w (Ho & Salimans 2022): with labels and ``w != 1``,
              ``D_w = D(x, s, null) + w (D(x, s, labels) - D(x, s, null))``, null labels = -1 (one network
              call on the doubled batch).  See ``guided``.
``stats``     a dict that receives ``stats["nfe"]``: denoiser evaluations per sample (a guided evaluation
              counts once), and ``stats["calls"]``: denoiser calls made.  ``sample_ode`` also sets
              ``stats["nfe_per_sample"]``.  Alternatively wrap the denoiser in ``CountingDenoiser``.

The samplers draw no random numbers, and euler / heun / dpmpp make no host syncs inside their loops
(the grid is read into Python floats once); they work under ``torch.inference_mode()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "CountingDenoiser",
    "GuidedDenoiser",
    "guided",
    "sample_euler",
    "sample_ddim",
    "sample_heun",
    "sample_dpmpp",
    "LOWER_ORDER_FINAL",
    "lower_order_rule",
    "sample_dpmpp_2m",
    "sample_dpmpp_3m",
    "sample_ode",
    "SAMPLERS",
    "get_sampler",
]

Denoiser = Callable[..., Tensor]
NULL_LABEL = -1


class CountingDenoiser:
    """Wraps a denoiser and counts its evaluations in ``.nfe``."""

    def __init__(self, denoiser: Denoiser):
        self.denoiser = denoiser
        self.nfe = 0

    def __call__(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None) -> Tensor:
        self.nfe += 1
        return self.denoiser(x, sigma, labels)


class GuidedDenoiser:
    """Classifier-free guidance: ``D(x, s, null) + w (D(x, s, labels) - D(x, s, null))``, null labels = -1.

    The conditional and unconditional halves go through the wrapped denoiser as one doubled batch.
    Without labels, or with ``w == 1``, it is the wrapped denoiser.
    """

    def __init__(self, denoiser: Denoiser, guidance: float = 1.0):
        self.denoiser = denoiser
        self.guidance = float(guidance)

    def __call__(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None) -> Tensor:
        if labels is None or self.guidance == 1.0:
            return self.denoiser(x, sigma, labels)
        labels = torch.as_tensor(labels, device=x.device).reshape(-1)
        if isinstance(sigma, Tensor) and sigma.numel() > 1:
            sigma = torch.cat([sigma.reshape(-1), sigma.reshape(-1)])
        both = self.denoiser(
            torch.cat([x, x]), sigma, torch.cat([labels, torch.full_like(labels, NULL_LABEL)])
        )
        cond, uncond = both.chunk(2)
        return torch.lerp(uncond, cond, self.guidance)


def guided(denoiser: Denoiser, guidance: float) -> Denoiser:
    """``denoiser`` with classifier-free guidance weight ``guidance`` (itself when ``guidance == 1``)."""
    return denoiser if float(guidance) == 1.0 else GuidedDenoiser(denoiser, guidance)


# -- shared set-up ----------------------------------------------------------------------------------------------


def _grid(sigmas: Tensor | list[float], x: Tensor) -> tuple[list[float], Tensor]:
    """Validate the grid; return it as Python floats (one host read) and as 0-d device tensors."""
    sig_t = torch.as_tensor(sigmas, dtype=torch.float64).detach().reshape(-1).cpu()
    sig = sig_t.tolist()
    if len(sig) < 2:
        raise ValueError(f"sigmas must hold at least 2 noise levels (steps >= 1), got {len(sig)}.")
    if any(not math.isfinite(s) for s in sig) or any(s <= 0 for s in sig[:-1]) or sig[-1] < 0:
        raise ValueError("sigmas must be finite and positive, except a final 0.")
    if any(b >= a for a, b in zip(sig[:-1], sig[1:])):
        raise ValueError("sigmas must be strictly descending (from sigma_max to sigma_min, then 0).")
    sigma_dtype = torch.float32 if x.device.type == "mps" else torch.float64
    return sig, sig_t.to(device=x.device, dtype=sigma_dtype)


def _prepare(
    denoiser: Denoiser, x: Tensor, labels: Tensor | None, guidance: float
) -> tuple[CountingDenoiser, Tensor | None]:
    if labels is not None:
        labels = torch.as_tensor(labels, device=x.device).reshape(-1)
        if labels.numel() != x.shape[0]:
            raise ValueError(f"labels has {labels.numel()} entries for a batch of {x.shape[0]} samples.")
    if float(guidance) != 1.0 and labels is None:
        raise ValueError(
            f"guidance={guidance} needs class labels (classifier-free guidance mixes D(x|y) and D(x|null))."
        )
    return CountingDenoiser(guided(denoiser, guidance)), labels


def _report(stats: dict | None, counter: CountingDenoiser) -> None:
    if stats is not None:
        stats["nfe"] = counter.nfe
        stats["calls"] = counter.nfe


# -- fixed-grid solvers ---------------------------------------------------------------------------------------


def sample_euler(
    denoiser: Denoiser,
    x_T: Tensor,
    sigmas: Tensor,
    labels: Tensor | None = None,
    *,
    guidance: float = 1.0,
    stats: dict | None = None,
) -> Tensor:
    """Euler / DDIM (eta = 0): ``x_{i+1} = D_i + (sigma_{i+1} / sigma_i) (x_i - D_i)``; N steps, N evaluations."""
    sig, sig_d = _grid(sigmas, x_T)
    D, labels = _prepare(denoiser, x_T, labels, guidance)
    x = x_T
    for i in range(len(sig) - 1):
        denoised = D(x, sig_d[i], labels)
        x = torch.lerp(denoised, x, sig[i + 1] / sig[i])  # == x + (s' - s) (x - D) / s
    _report(stats, D)
    return x


sample_ddim = sample_euler


def sample_heun(
    denoiser: Denoiser,
    x_T: Tensor,
    sigmas: Tensor,
    labels: Tensor | None = None,
    *,
    guidance: float = 1.0,
    stats: dict | None = None,
) -> Tensor:
    """EDM Algorithm 1 with S_churn = 0: Euler predictor + trapezoidal corrector, except into sigma = 0.

    With ``N`` steps ending in 0 this costs ``2N - 1`` evaluations (18 steps -> 35).
    """
    sig, sig_d = _grid(sigmas, x_T)
    D, labels = _prepare(denoiser, x_T, labels, guidance)
    x = x_T
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = D(x, sig_d[i], labels)
        x_next = torch.lerp(denoised, x, s_next / s)  # Euler step
        if s_next > 0:  # 2nd-order correction: average the slopes at both ends
            d = (x - denoised) / s
            d_next = (x_next - D(x_next, sig_d[i + 1], labels)) / s_next
            x_next = x + (0.5 * (s_next - s)) * (d + d_next)
        x = x_next
    _report(stats, D)
    return x


#: the rules ``sample_dpmpp(lower_order_final=...)`` takes (``True`` is ``"dpm-solver"``, ``False`` is ``"off"``)
LOWER_ORDER_FINAL = ("dpm-solver", "diffusers", "off")


def lower_order_rule(value: bool | str) -> str:
    """``lower_order_final`` (a bool or one of ``LOWER_ORDER_FINAL``, ``-``/``_`` alike) -> its canonical name."""
    if isinstance(value, bool):
        return "dpm-solver" if value else "off"
    key = str(value).lower().replace("_", "-")
    key = {"true": "dpm-solver", "dpmsolver": "dpm-solver", "false": "off", "none": "off"}.get(key, key)
    if key not in LOWER_ORDER_FINAL:
        raise ValueError(f"lower_order_final must be one of {', '.join(LOWER_ORDER_FINAL)} (or true / false), "
                         f"got {value!r}.")
    return key


def sample_dpmpp(
    denoiser: Denoiser,
    x_T: Tensor,
    sigmas: Tensor,
    labels: Tensor | None = None,
    *,
    order: int = 2,
    lower_order_final: bool | str = True,
    legacy_3m: bool = False,
    guidance: float = 1.0,
    stats: dict | None = None,
) -> Tensor:
    """DPM-Solver++ multistep (data prediction) of ``order`` 1, 2 or 3 in ``lambda = -log sigma``.

    With ``h = lambda_{i+1} - lambda_i`` and the exponential-integrator weights
    ``phi_1 = expm1(-h)``, ``phi_2 = phi_1 / h + 1``, ``phi_3 = phi_2 / h - 1/2`` (alpha = 1 here):

    * order 1: ``x' = (s'/s) x - phi_1 D_0``  (== DDIM / Euler)
    * order 2: ``... - phi_1 / 2 * D1``, ``D1 = (D_0 - D_{-1}) / r_0`` (DPM-Solver++(2M))
    * order 3: ``... + phi_2 D1 - phi_3 D2`` from the last three denoised values (DPM-Solver++(3M)), where
      ``D1 ~ h x0'`` and ``D2 = 2 (D1_0 - D1_1) / (r_0 + r_1) ~ h^2 x0''`` (Taylor expansion of x0(lambda)).

    Note on 3M: the reference codes (dpm-solver, diffusers, k-diffusion) use ``D2 = (D1_0 - D1_1) / (r_0 + r_1)``,
    i.e. ``h^2 x0'' / 2``, which halves the second-derivative term and makes their "3M" converge at order 2
    (measured on a Gaussian mixture: error ratio 2^2.1 per step doubling vs 2^3.1 here).  ``legacy_3m=True``
    reproduces their coefficient exactly.

    Step ``i`` uses order ``min(order, i + 1)`` (warm-up).  ``lower_order_final`` (``LOWER_ORDER_FINAL``), with
    fewer than 15 steps, caps the order of the last steps at the number of steps left, counted as

    * ``True`` / ``"dpm-solver"`` (default): over the steps between non-zero noise levels: the final step into
      sigma = 0 is DPM-Solver's extra ``denoise_to_zero`` evaluation, so the last step *into* ``sigma_{N-1}`` is
      first order (LuChengTHU/dpm-solver ``DPM_Solver.sample(method="multistep")``: ``step_order = min(order,
      steps + 1 - step)``; its code applies it below 10 steps, its docstring and diffusers below 15: we use 15);
    * ``"diffusers"``: over all steps, the one into sigma = 0 included (diffusers' ``DPMSolverMultistepScheduler``
      ``lower_order_final`` / ``lower_order_second`` with ``final_sigmas_type="zero"``): the step into 0 is first
      order, which is the last denoised value anyway, and the one before it at most second order, so 2M is not
      lowered at all; on a grid ending at a non-zero sigma (``final_sigmas_type="sigma_min"``) both rules agree;
    * ``False`` / ``"off"``: never (only the warm-up).

    Decision: the default stays dpm-solver's rule, so the suite's existing DPM-Solver++ samples do not change; it
    is also the more stable one at very few steps (the reason both libraries lower the order at all).  Sample
    a diffusers pipeline with ``"diffusers"`` to reproduce the pipeline's own DPM-Solver++ below 15 steps.

    The step into sigma = 0 returns the last denoised value.  N steps cost N evaluations.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"DPM-Solver++ order must be 1, 2 or 3, got {order!r}.")
    rule = lower_order_rule(lower_order_final)
    sig, sig_d = _grid(sigmas, x_T)
    D, labels = _prepare(denoiser, x_T, labels, guidance)
    n = len(sig) - 1
    n_ode = n - 1 if sig[-1] == 0 else n  # transitions between non-zero noise levels
    lam = [-math.log(s) if s > 0 else math.inf for s in sig]
    lower_final = rule != "off" and n < 15
    left = n if rule == "diffusers" else n_ode  # steps the rule counts (diffusers: the one into 0 too)
    x = x_T
    hist: list[Tensor] = []  # previous denoised values, most recent last
    for i in range(n):
        denoised = D(x, sig_d[i], labels)
        if sig[i + 1] == 0:
            x = denoised
            break
        k = min(order, i + 1)
        if lower_final:
            k = min(k, left - i)
        h = lam[i + 1] - lam[i]
        phi1 = math.expm1(-h)
        x_next = torch.lerp(denoised, x, sig[i + 1] / sig[i])  # (s'/s) x - phi_1 D_0
        if k >= 2:
            r0 = (lam[i] - lam[i - 1]) / h
            d1_0 = (denoised - hist[-1]) * (1.0 / r0)
            if k == 2:
                x_next = x_next + (-0.5 * phi1) * d1_0
            else:
                r1 = (lam[i - 1] - lam[i - 2]) / h
                d1_1 = (hist[-1] - hist[-2]) * (1.0 / r1)
                diff = d1_0 - d1_1
                d1 = d1_0 + (r0 / (r0 + r1)) * diff
                d2 = diff * ((1.0 if legacy_3m else 2.0) / (r0 + r1))  # ~ h^2 x0'' (legacy: h^2 x0'' / 2)
                phi2 = phi1 / h + 1.0
                phi3 = phi2 / h - 0.5
                x_next = x_next + phi2 * d1 - phi3 * d2
        hist = [*hist[-1:], denoised]
        x = x_next
    _report(stats, D)
    return x


def sample_dpmpp_2m(
    denoiser: Denoiser, x_T: Tensor, sigmas: Tensor, labels: Tensor | None = None, **opts
) -> Tensor:
    """DPM-Solver++(2M): ``sample_dpmpp`` with ``order=2``."""
    return sample_dpmpp(denoiser, x_T, sigmas, labels, order=2, **opts)


def sample_dpmpp_3m(
    denoiser: Denoiser, x_T: Tensor, sigmas: Tensor, labels: Tensor | None = None, **opts
) -> Tensor:
    """DPM-Solver++(3M): ``sample_dpmpp`` with ``order=3``."""
    return sample_dpmpp(denoiser, x_T, sigmas, labels, order=3, **opts)


# -- adaptive ODE solver --------------------------------------------------------------------------------------


def _odeint_lambda(
    D: Denoiser, x: Tensor, labels: Tensor | None, lam0: float, lam1: float, sigma_dtype: torch.dtype, **kw
) -> Tensor:
    from torchdiffeq import odeint

    def f(lam: Tensor, y: Tensor) -> Tensor:  # dx/dlambda = D(x, sigma) - x, sigma = exp(-lambda)
        return D(y, torch.exp(-lam).to(sigma_dtype), labels) - y

    t = torch.tensor([lam0, lam1], dtype=torch.float64, device=x.device)
    return odeint(f, x, t, **kw)[-1]


def sample_ode(
    denoiser: Denoiser,
    x_T: Tensor,
    sigmas: Tensor,
    labels: Tensor | None = None,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    per_sample: bool = True,
    options: dict | None = None,
    guidance: float = 1.0,
    stats: dict | None = None,
) -> Tensor:
    """Adaptive probability-flow ODE solve (torchdiffeq ``odeint``) in ``lambda = -log sigma``.

    Integrates from ``sigmas[0]`` to the smallest non-zero sigma and, if the grid ends in 0, finishes
    with ``x_0 = D(x, sigma_min)``; only the two ends of ``sigmas`` matter.  ``per_sample=True`` solves
    each sample alone so its adaptive steps do not depend on its batch-mates (``False``: one joint solve,
    faster, but a sample then depends on the batch it is in).
    """
    sig, sig_d = _grid(sigmas, x_T)
    D, labels = _prepare(denoiser, x_T, labels, guidance)
    final_zero = sig[-1] == 0
    s_end = sig[-2] if final_zero else sig[-1]
    kw = {"rtol": rtol, "atol": atol, "method": method, "options": options}
    lam0, lam1 = -math.log(sig[0]), -math.log(s_end)
    sigma_dtype = sig_d.dtype
    groups = [slice(b, b + 1) for b in range(x_T.shape[0])] if per_sample else [slice(None)]
    out, nfe = [], []
    for g in groups:
        Dg = CountingDenoiser(D)
        lab = None if labels is None else labels[g]
        x = x_T[g]
        if lam1 > lam0:
            x = _odeint_lambda(Dg, x, lab, lam0, lam1, sigma_dtype, **kw)
        if final_zero:
            x = Dg(x, sig_d[-2], lab)
        out.append(x)
        nfe.append(Dg.nfe)
    if stats is not None:
        stats["nfe"] = max(nfe)
        stats["calls"] = D.nfe
        stats["nfe_per_sample"] = nfe if per_sample else nfe * x_T.shape[0]
    return torch.cat(out) if len(out) > 1 else out[0]


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "euler": sample_euler,
    "ddim": sample_euler,
    "heun": sample_heun,
    "dpmpp": sample_dpmpp,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_3m": sample_dpmpp_3m,
    "ode": sample_ode,
}


def get_sampler(name: str | Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Sampler by name (see ``SAMPLERS``); a callable is returned unchanged."""
    if callable(name):
        return name
    key = str(name).lower().replace("-", "_").replace("++", "pp")
    if key not in SAMPLERS:
        raise ValueError(f"Unknown sampler {name!r}; valid samplers are: {', '.join(SAMPLERS)}.")
    return SAMPLERS[key]
