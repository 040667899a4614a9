"""Consistency models: consistency training (CT) and distillation (CD) over the suite's networks.

Song, Dhariwal, Chen & Sutskever 2023, "Consistency Models" (CM): a network ``f(x, sigma)`` that maps every point of a
probability-flow ODE trajectory to its origin, parameterised (Sec. 3, App. C) as

    f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma)),
    c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2),   c_out = (sigma - sigma_min) sd / sqrt(sd^2 + sigma^2),

with EDM's ``c_in`` and ``c_noise`` (``ConsistencyPrecond``), so ``f(x, sigma_min) = x`` exactly.  Training
minimises ``lambda(sigma_i) d(f_theta(x + sigma_{i+1} z, sigma_{i+1}), f_theta-(x_hat_i, sigma_i))`` over adjacent
levels of the Karras discretisation ``sigma_1 < ... < sigma_N`` (``karras_discretisation``), where ``x_hat_i`` is
``x + sigma_i z`` for CT (Alg. 3) and one deterministic teacher ODE step from ``sigma_{i+1}`` to ``sigma_i`` for CD
(Alg. 2).  The target ``theta-`` is an EMA of the student with decay ``mu(k)``; ``mu = 0`` is the student itself
under stop-grad (Song & Dhariwal 2023, "Improved Techniques for Training Consistency Models", iCT, Sec. 3.2).

``ConsistencyRecipe`` holds the choices: the step-count schedule ``N(k)`` (``cm_steps``: CM App. C; ``ict_steps``:
iCT Sec. 3.4, doubling from ``s0`` to ``s1``; ``fixed``: ``N = s1``), the distance (squared L2 or pseudo-Huber
``sqrt(|a-b|^2 + c^2) - c`` with ``c = 0.00054 sqrt(d)``, iCT Sec. 3.3; LPIPS needs VGG weights the suite cannot
download, so it is refused), the index distribution (uniform, CM; log-normal over the discretisation, iCT Sec. 3.5)
and the weighting (uniform, CM; ``1 / (sigma_{i+1} - sigma_i)``, iCT Sec. 3.1).  CT defaults to iCT's recipe, CD to
the CM paper's CIFAR-10 one (``N = 18``, ``mu = 0.95``, Heun teacher step).

``ConsistencyTraining`` / ``ConsistencyDistillation`` are mixins over a preset (``CTDiT = CT + DiT``, ...), so every
network family is trained through its own preset's ``build_net``; the classes are in ``CONSISTENCY_MODELS``, where
checkpoint loading finds them.  A consistency model is a ``Denoiser`` (``f`` estimates ``x_0``): its checkpoints load
through ``load_denoiser`` and sample with ``sampling.consistency.sample_consistency`` (``--sampler consistency``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .diffusion_module import compiled_forward
from .kernels import EDMKernel, karras_sigmas
from .precond import EDMPrecond, _bc
from .presets import DDPM, DDPMpp, DiT, UViT

__all__ = ["ConsistencyPrecond", "karras_discretisation", "cm_steps", "ict_steps", "cm_target_decay",
           "squared_l2", "pseudo_huber", "lognormal_index_probs", "ConsistencyRecipe", "ConsistencyModel",
           "ConsistencyTraining", "ConsistencyDistillation", "CONSISTENCY_MODELS",
           "CTDDPM", "CTDDPMpp", "CTUViT", "CTDiT", "CDDDPM", "CDDDPMpp", "CDUViT", "CDDiT"]


class ConsistencyPrecond(EDMPrecond):
    """CM App. C: ``c_skip``, ``c_out`` vanish / equal 1 at ``sigma_min``; ``c_in``, ``c_noise`` as EDM (Eq. 7)."""

    def __init__(self, net: nn.Module, kernel: EDMKernel, sigma_min: float | None = None):
        super().__init__(net, kernel)
        smin = float(self.kernel.sigma_min if sigma_min is None else sigma_min)
        # the larger of sigma_min and its float32 rounding: sigma_min given in float32 or float64 gives c_out = 0
        self.sigma_min = max(smin, float(torch.tensor(smin, dtype=torch.float32)))

    def coefficients(self, sigma):
        sd = self.sigma_data
        gap = (sigma - self.sigma_min).clamp(min=0)  # sigma - sigma_min (0 at and below sigma_min)
        c_skip = sd**2 / (gap**2 + sd**2)  # exactly 1 at sigma_min
        c_out = gap * sd / (sd**2 + sigma**2).sqrt()  # exactly 0 at sigma_min
        c_in = 1.0 / (sigma**2 + sd**2).sqrt()
        return c_skip, c_out, c_in, 0.25 * torch.log(sigma)


# ---------------------------------------------------------------------------- discretisation and schedules


def karras_discretisation(N: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """CM Sec. 5: ``N`` ascending levels ``sigma_1 = sigma_min < ... < sigma_N = sigma_max`` (float64), Karras Eq. 5."""
    if isinstance(N, bool) or not isinstance(N, int) or N < 2:
        raise ValueError(f"a consistency discretisation needs N >= 2 noise levels, got {N!r}.")
    return karras_sigmas(N, sigma_min, sigma_max, rho)[:-1].flip(0)


def cm_steps(k: int, K: int, s0: int, s1: int) -> int:
    """CM App. C: ``N(k) = ceil(sqrt(k / K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1`` (CIFAR-10 CT: s0 = 2, s1 = 150)."""
    return int(math.ceil(math.sqrt(k / K * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1)) + 1


def ict_steps(k: int, K: int, s0: int, s1: int) -> int:
    """iCT Sec. 3.4: ``N(k) = min(s0 2^floor(k / K'), s1) + 1``, ``K' = floor(K / (log2 floor(s1 / s0) + 1))``
    (s0 = 10, s1 = 1280)."""
    K_prime = max(1, math.floor(K / (math.log2(math.floor(s1 / s0)) + 1)))
    return min(s0 * 2 ** (k // K_prime), s1) + 1


def cm_target_decay(N: int, s0: int, mu0: float) -> float:
    """CM App. C: the target EMA decay ``mu(k) = exp(s0 log(mu0) / N(k))`` (CIFAR-10 CT: mu0 = 0.9); 0 for mu0 = 0."""
    return 0.0 if mu0 <= 0 else math.exp(s0 * math.log(mu0) / N)


def squared_l2(a: Tensor, b: Tensor) -> Tensor:
    """``||a - b||_2^2`` per sample (CM's L2 metric)."""
    return (a.float() - b.float()).square().flatten(1).sum(1)


def pseudo_huber(a: Tensor, b: Tensor, c: float) -> Tensor:
    """iCT Sec. 3.3: ``sqrt(||a - b||_2^2 + c^2) - c`` per sample."""
    return (squared_l2(a, b) + c * c).sqrt() - c


def lognormal_index_probs(sigmas: Tensor, P_mean: float = -1.1, P_std: float = 2.0) -> Tensor:
    """iCT Sec. 3.5: ``p(i) ∝ erf((ln sigma_{i+1} - P_mean) / (sqrt 2 P_std)) - erf((ln sigma_i - P_mean) / (sqrt 2
    P_std))`` for the ``N - 1`` pairs of an ascending discretisation (the log-normal mass between the two levels)."""
    cdf = torch.erf((sigmas.log() - P_mean) / (math.sqrt(2.0) * P_std))
    p = cdf[1:] - cdf[:-1]
    return p / p.sum()


SCHEDULES = {"ict": ict_steps, "cm": cm_steps, "fixed": lambda k, K, s0, s1: int(s1)}
DISTANCES = ("pseudo_huber", "l2")
INDEX_SAMPLING = ("lognormal", "uniform")
WEIGHTINGS = ("ict", "uniform")


def _choice(value: str, valid: tuple[str, ...] | dict, option: str) -> str:
    if value not in valid:
        extra = " (LPIPS needs pretrained VGG / AlexNet weights, which the suite cannot download; use l2 or " \
                "pseudo_huber)" if option == "distance" and str(value).lower() == "lpips" else ""
        raise ValueError(f"Unknown {option} {value!r}{extra}; valid ones are: {', '.join(valid)}.")
    return value


@dataclass(frozen=True)
class ConsistencyRecipe:
    """The choices of a consistency objective (see the module docstring); ``from_hparams`` validates them."""

    schedule: str = "ict"  # N(k): ict | cm | fixed (N = s1)
    s0: int = 10  # initial discretisation steps (iCT 10; CM CT 2)
    s1: int = 1280  # final discretisation steps (iCT 1280; CM CT 150; fixed: N itself, CM CD 18)
    mu0: float = 0.0  # target EMA: 0 = the student under stop-grad (iCT); cm schedule: mu(k) from mu0 (CM CT 0.9)
    distance: str = "pseudo_huber"  # pseudo_huber | l2
    huber_c: float | None = None  # pseudo-Huber c; None: 0.00054 sqrt(d)
    index_sampling: str = "lognormal"  # lognormal (iCT) | uniform (CM)
    P_mean: float = -1.1  # iCT's log-normal over the discretisation
    P_std: float = 2.0
    weighting: str = "ict"  # ict: 1 / (sigma_{i+1} - sigma_i) | uniform

    def __post_init__(self):
        _choice(self.schedule, SCHEDULES, "schedule")
        _choice(self.distance, DISTANCES, "distance")
        _choice(self.index_sampling, INDEX_SAMPLING, "index_sampling")
        _choice(self.weighting, WEIGHTINGS, "weighting")
        for name in ("s0", "s1"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}.")
        if self.schedule != "fixed" and self.s1 < self.s0:
            raise ValueError(f"s1 ({self.s1}) must be at least s0 ({self.s0}).")
        if not 0.0 <= float(self.mu0) < 1.0:
            raise ValueError(f"mu0 must lie in [0, 1), got {self.mu0!r}.")

    def steps(self, k: int, K: int) -> int:
        """``N(k)``, the number of discretisation levels at training step ``k`` of ``K`` (at least 2)."""
        return max(2, SCHEDULES[self.schedule](min(int(k), K), K, self.s0, self.s1))

    def target_decay(self, N: int) -> float:
        """``mu(k)``: CM's adaptive decay under the ``cm`` schedule, else ``mu0``."""
        return cm_target_decay(N, self.s0, self.mu0) if self.schedule == "cm" else float(self.mu0)

    def draw(self, x0: Tensor, sigmas: Tensor, generator: torch.Generator, rank: int = 0, world_size: int = 1):
        """``(sigma_i, sigma_{i+1}, z)`` of this rank's rows, drawn for the global batch from ``generator``."""
        b, dev = x0.shape[0], x0.device
        rows = slice(rank * b, (rank + 1) * b)
        if self.index_sampling == "uniform":
            i = torch.randint(0, len(sigmas) - 1, (b * world_size,), generator=generator, device=dev)
        else:
            p = lognormal_index_probs(sigmas, self.P_mean, self.P_std).to(dev)
            i = torch.multinomial(p, b * world_size, replacement=True, generator=generator)
        z = torch.randn((b * world_size, *x0.shape[1:]), generator=generator, device=dev, dtype=x0.dtype)
        s = sigmas.to(dev)
        return s[i[rows]].float(), s[i[rows] + 1].float(), z[rows]

    def loss(self, f_hi: Tensor, f_lo: Tensor, s_lo: Tensor, s_hi: Tensor) -> Tensor:
        """``mean(lambda(sigma_i) d(f_hi, f_lo))``."""
        if self.distance == "l2":
            d = squared_l2(f_hi, f_lo)
        else:
            c = self.huber_c if self.huber_c is not None else 0.00054 * math.sqrt(f_hi[0].numel())
            d = pseudo_huber(f_hi, f_lo, c)
        w = 1.0 / (s_hi.double() - s_lo.double()) if self.weighting == "ict" else torch.ones_like(s_lo)
        return (w.float() * d).mean()


# ---------------------------------------------------------------------------- the LightningModule mixins


class ConsistencyModel:
    """Mixin over a ``DiffusionModule`` preset: the consistency parameterisation, objective and target network.

    Args (besides the preset's and ``DiffusionModule``'s; ``kernel`` must be ``edm``, whose ``sigma_min``,
    ``sigma_max``, ``rho`` and ``sigma_data`` are the consistency model's ``epsilon``, ``T``, ``rho`` and ``sigma_data``):
        schedule, s0, s1, mu0, distance, huber_c, index_sampling, P_mean, P_std, weighting: ``ConsistencyRecipe``.
        schedule_steps: ``K`` of the step-count schedule (default ``trainer.max_steps``).
        optimizer: ``adam`` (AdamW, as ``DiffusionModule``) or ``radam`` (RAdam, the papers').
    ``val_sampler`` defaults to ``consistency`` with ``val_steps: 1`` (one-step samples); with ``init_from`` (e.g. the
    teacher's checkpoint, CM's CD initialisation) every parameter is trained unless ``trainable`` says otherwise.
    """

    procedure = "consistency"

    def __init__(self, *, schedule: str, s0: int, s1: int, mu0: float, distance: str, index_sampling: str,
                 weighting: str, huber_c: float | None = None, P_mean: float = -1.1, P_std: float = 2.0,
                 schedule_steps: int | None = None, optimizer: str = "adam", **kwargs):
        self.recipe = ConsistencyRecipe(schedule, s0, s1, float(mu0), distance, huber_c, index_sampling,
                                        float(P_mean), float(P_std), weighting)
        _choice(optimizer, ("adam", "radam"), "optimizer")
        if kwargs.get("precond") not in (None, "consistency"):
            raise ValueError(f"a consistency model uses its own preconditioning (CM App. C), not {kwargs['precond']!r}.")
        kwargs.pop("precond", None)
        kwargs.setdefault("kernel", "edm")
        kwargs.setdefault("val_sampler", "consistency")
        kwargs.setdefault("val_steps", 1)
        if kwargs.get("init_from") and kwargs.get("trainable") is None:
            kwargs["trainable"] = ["*"]
        if kwargs["kernel"] != "edm":
            raise ValueError(f"a consistency model lives in the EDM variable: kernel must be 'edm' (its sigma_min, "
                             f"sigma_max, rho and sigma_data), got {kwargs['kernel']!r}.")
        super().__init__(**kwargs)
        self.precond_name = "consistency"
        net = self.model.net  # the preset's network, built by its build_net; same parameters (and freezing)
        self.model = ConsistencyPrecond(net, self.kernel)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.target = copy.deepcopy(self.model).requires_grad_(False) if self.recipe.mu0 > 0 else None
        if self.hparams.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.__dict__["_forward"] = compiled_forward(self.model, self.hparams.compile)
        self._last_N: int | None = None

    # -- the objective ------------------------------------------------------------------------
    def schedule_total(self) -> int:
        """``K`` of ``N(k)``: ``schedule_steps`` or ``trainer.max_steps`` (one sentence when neither is set)."""
        K = self.hparams.get("schedule_steps")
        if K is None and self._trainer is not None:
            K = int(self.trainer.max_steps)
        if K is None or K < 1:
            if self.recipe.schedule == "fixed":
                return 1
            raise ValueError(f"the {self.recipe.schedule!r} step-count schedule N(k) needs the number of training "
                             f"steps K: set trainer.max_steps or model schedule_steps.")
        return int(K)

    def discretisation(self, step: int) -> Tensor:
        """The ascending levels ``sigma_1 .. sigma_N(k)`` of training step ``step``."""
        N = self.recipe.steps(step, self.schedule_total())
        k = self.kernel
        return karras_discretisation(N, k.sigma_min, k.sigma_max, k.rho)

    def lower_point(self, x0: Tensor, z: Tensor, x_hi: Tensor, s_hi: Tensor, s_lo: Tensor, labels) -> Tensor:
        """``x_hat`` at ``sigma_i``: CT ``x0 + sigma_i z``, CD the teacher's ODE step (subclasses)."""
        raise NotImplementedError

    def target_denoiser(self):
        """``f_theta-``: the target EMA copy, or the student itself (``mu0 = 0``; called under ``no_grad``)."""
        return self.target if self.target is not None else self._forward

    def training_step(self, batch, batch_idx):
        x0, labels = batch
        labels = labels if self.num_classes else None
        rank, world = self.rank_and_world()
        step = self.global_step
        sigmas = self.discretisation(step)
        self._last_N = len(sigmas)
        s_lo, s_hi, z = self.recipe.draw(x0, sigmas, self.step_generator(step, x0.device), rank, world)
        x_hi = x0 + _bc(s_hi, x0) * z
        with torch.no_grad():
            x_lo = self.lower_point(x0, z, x_hi, s_hi, s_lo, labels)
        seed = self.dropout_seed(step, rank)  # the same dropout masks for both evaluations (CM's code, iCT)
        with self.seeded_rng(seed, x0.device):
            f_hi = self.denoise(x_hi, s_hi, labels)
        with torch.no_grad(), self.seeded_rng(seed, x0.device):
            f_lo = self.target_denoiser()(x_lo, s_lo, labels)
        loss = self.recipe.loss(f_hi, f_lo, s_lo, s_hi)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        self.log("train/discretisation_steps", float(len(sigmas)))
        return loss

    # -- target network, optimiser, initialisation ----------------------------------------------
    @torch.no_grad()
    def update_target(self, mu: float) -> None:
        """``theta- <- stopgrad(mu theta- + (1 - mu) theta)`` (CM Alg. 2 / 3)."""
        torch._foreach_lerp_(list(self.target.parameters()), [p.detach() for p in self.model.parameters()], 1.0 - mu)
        for tb, b in zip(self.target.buffers(), self.model.buffers()):
            tb.copy_(b)

    def optimizer_step(self, *args, **kwargs):
        out = super().optimizer_step(*args, **kwargs)  # the optimiser step and the evaluation EMA
        if self.target is not None and self._last_N is not None:
            mu = self.recipe.target_decay(self._last_N)
            self.update_target(mu)
            self.log("train/target_decay", mu)
        return out

    def configure_optimizers(self):
        out = super().configure_optimizers()
        if self.hparams.optimizer == "radam":
            params = [p for g in out["optimizer"].param_groups for p in g["params"]]
            opt = torch.optim.RAdam(params, lr=self.hparams.lr, betas=tuple(self.hparams.betas),
                                    weight_decay=self.hparams.weight_decay)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_factor)
            out = {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        return out

    def load_init_weights(self, path=None) -> None:
        super().load_init_weights(path)
        if self.target is not None:
            self.target.load_state_dict(self.model.state_dict())

    def check_compatible(self, meta: dict[str, Any], path: str, what: str = "init_from") -> None:
        """As the preset's, but ``init_from`` also takes a diffusion checkpoint (EDM preconditioning) of the same
        network: the CM paper initialises CD from the teacher's weights."""
        if what == "init_from" and meta.get("precond") == "edm":
            meta = {**meta, "precond": self.precond_name}
        super().check_compatible(meta, path, what)

    # -- provenance ---------------------------------------------------------------------------
    def run_config(self, dm=None) -> dict[str, Any]:
        cfg = super().run_config(dm)
        r = self.recipe
        cfg.update(procedure=self.procedure, schedule=r.schedule, s0=r.s0, s1=r.s1, mu0=r.mu0, distance=r.distance,
                   index_sampling=r.index_sampling, weighting=r.weighting,
                   sampling={"sampler": "consistency", "steps": int(self.hparams.val_steps), "grid": None})
        try:
            K = self.schedule_total()
            cfg.update(discretisation_steps=self.recipe.steps(self.global_step if self._trainer else 0, K),
                       final_discretisation_steps=self.recipe.steps(K, K))
        except ValueError:
            pass  # no K yet (outside a trainer without schedule_steps)
        return cfg


class ConsistencyTraining(ConsistencyModel):
    """CT (CM Alg. 3; iCT): ``x_hat_i = x0 + sigma_i z`` with the ``z`` of ``x0 + sigma_{i+1} z``; no teacher.
    Defaults: iCT's recipe (``ict`` schedule 10 -> 1280, no target EMA, pseudo-Huber, log-normal, ``1/Δσ``)."""

    procedure = "ct"

    def __init__(self, *, schedule: str = "ict", s0: int = 10, s1: int = 1280, mu0: float = 0.0,
                 distance: str = "pseudo_huber", index_sampling: str = "lognormal", weighting: str = "ict", **kwargs):
        super().__init__(schedule=schedule, s0=s0, s1=s1, mu0=mu0, distance=distance, index_sampling=index_sampling,
                         weighting=weighting, **kwargs)

    def lower_point(self, x0, z, x_hi, s_hi, s_lo, labels):
        return x0 + _bc(s_lo, x0) * z


class ConsistencyDistillation(ConsistencyModel):
    """CD (CM Alg. 2): ``x_hat_i`` is one deterministic ODE step of a frozen teacher from ``sigma_{i+1}`` to ``sigma_i``.

    Args:
        teacher: any model spec (``teachers.load_teacher``: a suite checkpoint, ``optimal:`` — the optimal denoiser
            of the student's own subset —, ``edm:FILE.pkl``, ``diffusers:...``); loaded at the start of ``fit`` for
            the data module's subset, refused in one sentence for another image shape or class count.
        solver: ``heun`` (CM's default) or ``euler``.
    Defaults: the CM paper's CIFAR-10 CD recipe (``N = 18`` fixed, ``mu = 0.95``, uniform indices and weights; its
    LPIPS distance is not available, so squared L2).
    """

    procedure = "cd"

    def __init__(self, *, teacher: str | None = None, solver: str = "heun", schedule: str = "fixed", s0: int = 18,
                 s1: int = 18, mu0: float = 0.95, distance: str = "l2", index_sampling: str = "uniform",
                 weighting: str = "uniform", **kwargs):
        if not teacher:
            raise ValueError("consistency distillation needs a teacher (model teacher: a checkpoint, 'optimal:' for "
                             "the optimal denoiser of the training subset, 'edm:FILE.pkl', ...).")
        _choice(solver, ("heun", "euler"), "solver")
        super().__init__(schedule=schedule, s0=s0, s1=s1, mu0=mu0, distance=distance, index_sampling=index_sampling,
                         weighting=weighting, **kwargs)
        self.__dict__["_teacher"] = None  # kept out of the module tree: never in the state_dict

    def load_teacher(self, data: dict[str, Any] | None, device) -> Any:
        """The ``Teacher`` of this student for the data module's kwargs ``data`` on ``device`` (loaded once per device)."""
        from .teachers import load_teacher

        t = self.__dict__.get("_teacher")
        device = torch.device(device)
        if t is None or t[0] != device:
            spec = str(self.hparams.teacher)
            self.__dict__["_teacher"] = (device, load_teacher(spec, self.image_shape, self.num_classes, data, device))
        return self.__dict__["_teacher"][1]

    @property
    def teacher(self):
        t = self.__dict__.get("_teacher")
        if t is None:
            raise ValueError("the teacher is loaded at the start of fit (or call load_teacher(data, device) first).")
        return t[1]

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.load_teacher(self.data_kwargs(), self.device)

    def lower_point(self, x0, z, x_hi, s_hi, s_lo, labels):
        D = self.teacher.denoiser
        lab = labels if self.num_classes else None
        h = _bc(s_lo - s_hi, x0)
        d = (x_hi - D(x_hi, s_hi, lab).to(x0.dtype)) / _bc(s_hi, x0)  # dx/dsigma = (x - D(x, sigma)) / sigma
        x_euler = x_hi + h * d
        if self.hparams.solver == "euler":
            return x_euler
        d_lo = (x_euler - D(x_euler, s_lo, lab).to(x0.dtype)) / _bc(s_lo, x0)
        return x_hi + 0.5 * h * (d + d_lo)  # Heun (EDM Alg. 1): the trapezoid of both slopes

    def run_config(self, dm=None) -> dict[str, Any]:
        cfg = super().run_config(dm)
        cfg.update(teacher=str(self.hparams.teacher), solver=self.hparams.solver)
        if dm is None and self._trainer is not None:
            dm = getattr(self.trainer, "datamodule", None)
        if dm is not None or self.__dict__.get("_teacher") is not None:
            t = self.__dict__.get("_teacher")
            prov = (t[1] if t is not None else self.load_teacher(self.data_kwargs(dm), "cpu")).provenance
            cfg.update(teacher_sha256=prov.get("sha256"), teacher_provenance=prov)
        return cfg


# ---------------------------------------------------------------------------- one class per network family


def _aliases(base) -> dict[str, str]:
    """A preset's checkpoints initialise its consistency models (``init_from``)."""
    return {base.arch: base.__name__, **base.network_aliases}


class CTDDPM(ConsistencyTraining, DDPM):
    """Consistency training of the DDPM U-Net."""
    public_path, network_aliases = "lightning_repro.module.CTDDPM", _aliases(DDPM)


class CTDDPMpp(ConsistencyTraining, DDPMpp):
    """Consistency training of the DDPM++ U-Net (the papers' CIFAR-10 networks are NCSN++, its sibling)."""
    public_path, network_aliases = "lightning_repro.module.CTDDPMpp", _aliases(DDPMpp)


class CTUViT(ConsistencyTraining, UViT):
    """Consistency training of U-ViT."""
    public_path, network_aliases = "lightning_repro.module.CTUViT", _aliases(UViT)


class CTDiT(ConsistencyTraining, DiT):
    """Consistency training of DiT."""
    public_path, network_aliases = "lightning_repro.module.CTDiT", _aliases(DiT)


class CDDDPM(ConsistencyDistillation, DDPM):
    """Consistency distillation into the DDPM U-Net."""
    public_path, network_aliases = "lightning_repro.module.CDDDPM", _aliases(DDPM)


class CDDDPMpp(ConsistencyDistillation, DDPMpp):
    """Consistency distillation into the DDPM++ U-Net."""
    public_path, network_aliases = "lightning_repro.module.CDDDPMpp", _aliases(DDPMpp)


class CDUViT(ConsistencyDistillation, UViT):
    """Consistency distillation into U-ViT."""
    public_path, network_aliases = "lightning_repro.module.CDUViT", _aliases(UViT)


class CDDiT(ConsistencyDistillation, DiT):
    """Consistency distillation into DiT."""
    public_path, network_aliases = "lightning_repro.module.CDDiT", _aliases(DiT)


#: ``procedure_arch`` -> class; ``checkpoints.preset_class`` looks checkpoints' class paths up here too
CONSISTENCY_MODELS: dict[str, type] = {
    "ct_ddpm": CTDDPM, "ct_ddpmpp": CTDDPMpp, "ct_uvit": CTUViT, "ct_dit": CTDiT,
    "cd_ddpm": CDDDPM, "cd_ddpmpp": CDDDPMpp, "cd_uvit": CDUViT, "cd_dit": CDDiT,
}
