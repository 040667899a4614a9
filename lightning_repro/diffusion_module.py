"""``DiffusionModule``: network + kernel + preconditioning + ``DenoisingLoss``, trained with Lightning.

The EMA of the weights (EDM's half-life in thousands of images, with ramp-up) is the model used for all sampling
and evaluation.  The training draws of step ``k`` are functions of ``(seed, k)``: sigma, noise and label dropout
come from a generator seeded by ``(seed, k)`` (``DenoisingLoss`` keeps this rank's rows of the global batch),
dropout masks from the default generators seeded by ``(seed, k, rank)`` inside a fork of the global RNG.  So
``--ckpt_path last`` repeats an uninterrupted run exactly, and DDP on ``W`` ranks with ``batch_size = B / W``
follows one process with ``batch_size = B`` up to float round-off (dropout masks excepted).  Fine-tuning and the
compatibility check of a resumed or ``init_from`` checkpoint: ``finetune.FineTuning``; presets: ``presets``.
"""

from __future__ import annotations

import copy
import hashlib
import math
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from .checkpoints import CKPT_KEY
from .finetune import FineTuning
from .kernels import Kernel, VPKernel, get_kernel
from .losses import DenoisingLoss
from .precond import Precond, get_precond

__all__ = ["DiffusionModule", "default_precond"]


def default_precond(kernel: Kernel) -> str:
    """EDM kernel -> EDM preconditioning; discrete VP -> DDPM timesteps; other kernels -> epsilon-prediction."""
    if kernel.name == "edm":
        return "edm"
    if isinstance(kernel, VPKernel) and kernel.discrete:
        return "ddpm"
    return "eps"


def compiled_forward(model: nn.Module, compile: bool) -> nn.Module:
    """``torch.compile(model, dynamic=False)`` when ``compile`` (else ``model``): a training step has one batch
    shape, and a second shape (another batch size in the same process) recompiles statically instead of turning the
    batch dimension symbolic, which inductor's CPU lowering of the U-Nets rejects (``cannot determine truth value of
    Relational: 64*((s0//2)) < 64``, torch 2.14)."""
    return torch.compile(model, dynamic=False) if compile else model


class DiffusionModule(FineTuning, L.LightningModule):
    """Base LightningModule; subclasses define ``build_net()``.

    Args:
        kernel: ``vp`` | ``vp_discrete`` | ``subvp`` | ``ve`` | ``edm``.
        kernel_kwargs: constants of the kernel (e.g. ``{"sigma_max": 100}``).
        precond: ``eps`` | ``ddpm`` | ``x0`` | ``v`` | ``edm``; default follows the kernel.
        image_shape: C, H, W (linked from the data module by the CLI).
        num_classes: 0 for unconditional (linked from ``data.conditional``).
        lr, weight_decay, betas, warmup_steps: AdamW with linear warm-up.
        lr_decay: ``constant`` (EDM) or ``cosine``: after the warm-up, half a cosine from ``lr`` to 0 at
            ``trainer.max_steps`` (Loshchilov & Hutter 2017), which averages the last steps' gradient noise away.
        ema_halflife_kimg, ema_rampup_ratio: EMA half-life in thousands of images (Karras et al. 2022).
        label_dropout: probability of replacing the label by the null class (classifier-free guidance).
        val_sampler, val_steps: deterministic sampler for the validation grid.
        seed: seed of the training noise stream (defaults to 0; the CLI links ``seed_everything``).
        channels_last, compile: speed options for GPUs.
        init_from: a lightning_repro checkpoint of the same architecture, or a published file of this preset's
            network (``edm:`` DDPM++, ``uvit:``, ``dit:``), whose EMA weights initialise the model and the EMA at
            the start of ``fit`` (fine-tuning; see ``finetune``).
        trainable: ``fnmatch`` patterns over the network's parameter names selecting what is trained (the rest
            is frozen); None: everything from scratch, ``attention_patterns`` with ``init_from``; ``["*"]``: all.
        regression_teacher: None (denoising score matching, the method) or a model spec (``optimal:`` = the optimal
            denoiser of the training subset, a checkpoint, ...) whose ``D(x, sigma)`` replaces ``x_0`` as the loss's
            target, loaded at the start of fit.  A diagnostic: with ``optimal:`` it removes the target's noise, so
            it shows how fast the network itself can learn the closed form; never a default that a claim about
            the closed form rests on.
    """

    arch: str = "base"

    @classmethod
    def class_path(cls) -> str:
        """The class path checkpoints record: a preset's public one (``lightning_repro.module.DiT``, whatever file
        defines it, so files can move without orphaning checkpoints), else the class's own."""
        return cls.__dict__.get("public_path") or f"{cls.__module__}.{cls.__qualname__}"

    def __init__(
        self,
        kernel: str = "edm",
        kernel_kwargs: dict[str, Any] | None = None,
        precond: str | None = None,
        image_shape: tuple[int, int, int] = (1, 8, 8),
        num_classes: int = 0,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        lr_decay: str = "constant",
        ema_halflife_kimg: float = 0.5,
        ema_rampup_ratio: float | None = 0.05,
        label_dropout: float = 0.0,
        val_sampler: str = "heun",
        val_steps: int = 18,
        seed: int = 0,
        channels_last: bool = False,
        compile: bool = False,
        init_from: str | None = None,
        trainable: list[str] | None = None,
        regression_teacher: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        if lr_decay not in ("constant", "cosine"):
            raise ValueError(f"lr_decay must be 'constant' or 'cosine', got {lr_decay!r}.")
        self.kernel = get_kernel(kernel, **(kernel_kwargs or {}))
        self.image_shape = tuple(int(v) for v in image_shape)
        self.num_classes = int(num_classes)
        self.precond_name = precond or default_precond(self.kernel)
        net = self.build_net()
        self.model: Precond = get_precond(self.precond_name, net, self.kernel)
        self.ema: Precond = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.loss = DenoisingLoss(self.kernel, label_dropout)
        self.trainable_patterns: list[str] | None = self._resolve_trainable(trainable, init_from)
        self._freeze_untrainable()
        self._init_loaded = False
        self._val_images: list[Tensor] = []
        self._val_seeds: list[Tensor] = []
        self._labels_checked = False
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
            self.ema = self.ema.to(memory_format=torch.channels_last)
        # kept out of the module tree (no duplicate state_dict keys)
        self.__dict__["_forward"] = compiled_forward(self.model, compile)

    # -- to be defined by presets -------------------------------------------------------------
    def build_net(self) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} must define build_net().")

    def net_kwargs(self) -> dict[str, Any]:
        c, h, w = self.image_shape
        if h != w:
            raise ValueError(f"image_shape {self.image_shape}: only square images are supported.")
        return dict(img_resolution=h, in_channels=c, out_channels=c, num_classes=self.num_classes)

    # -- the training draws and the loss (losses.DenoisingLoss) ------------------------------
    def data_kwargs(self, dm=None) -> dict[str, Any] | None:
        """The ``SubsetDataModule`` kwargs of ``dm`` (default the trainer's): what ``optimal:`` without a source and
        the run's recorded ``data`` mean."""
        if dm is None and self._trainer is not None:
            dm = getattr(self.trainer, "datamodule", None)
        hp = getattr(dm, "hparams", None)
        return None if hp is None else {k: v for k, v in hp.items() if not k.startswith("_")}

    def on_fit_start(self) -> None:
        super().on_fit_start()  # init_from, if given
        spec = self.hparams.get("regression_teacher")
        if spec:
            if type(self).training_step is not DiffusionModule.training_step:
                raise ValueError(f"regression_teacher replaces the target of denoising score matching; "
                                 f"{type(self).__name__} trains with a loss of its own.")
            from .teachers import load_teacher

            t = load_teacher(str(spec), self.image_shape, self.num_classes, self.data_kwargs(), self.device)
            self.loss.target = t.denoiser
            self.regression_teacher_provenance = dict(t.provenance)

    def step_generator(self, step: int, device) -> torch.Generator:
        """Generator of the training draws of global step ``step``: seeded by ``(seed, step)``, the same on every rank."""
        g = torch.Generator(device=device)
        g.manual_seed((int(self.hparams.seed) * 1_000_003 + int(step)) * 1009)
        return g

    def dropout_seed(self, step: int, rank: int = 0) -> int:
        """Seed of the dropout masks of global step ``step`` on rank ``rank``: a hash of ``(seed, step, rank)``."""
        key = f"dropout:{int(self.hparams.seed)}:{int(step)}:{int(rank)}".encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1

    @staticmethod
    @contextmanager
    def seeded_rng(seed: int, device: torch.device):
        """The block runs with the CPU generator and ``device``'s default generator seeded by ``seed``; both are
        restored afterwards (``torch.random.fork_rng``), so the program's other draws are untouched."""
        device = torch.device(device)
        accel = device.type != "cpu"
        with torch.random.fork_rng(devices=[device] if accel else [], device_type=device.type if accel else "cuda"):
            torch.random.default_generator.manual_seed(seed)
            if accel:
                backend = getattr(torch, device.type)
                with backend.device(device) if hasattr(backend, "device") else nullcontext():
                    backend.manual_seed(seed)  # this rank's device only (torch.manual_seed would seed them all)
            yield

    def rank_and_world(self) -> tuple[int, int]:
        """``(global_rank, world_size)`` of the trainer (``(0, 1)`` outside one)."""
        if self._trainer is None:
            return 0, 1
        return int(self.trainer.global_rank), int(self.trainer.world_size)

    def denoise(self, x: Tensor, sigma: Tensor, labels: Tensor | None = None) -> Tensor:
        """The trained denoiser as the loss calls it (compiled and channels_last where asked; labels only if
        the model is class-conditional)."""
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self._forward(x, sigma, labels if self.num_classes else None)

    def draw_noise(self, x0: Tensor, labels: Tensor | None, generator: torch.Generator, rank: int = 0,
                   world_size: int = 1):
        """The loss's draws of one step (``DenoisingLoss.draw``): sigma, noise, labels after dropout."""
        return self.loss.draw(x0, labels if self.num_classes else None, generator, rank, world_size)

    def loss_fn(self, x0: Tensor, labels: Tensor | None, sigma: Tensor, noise: Tensor) -> Tensor:
        """The loss for given draws (``DenoisingLoss.weighted_error``, Karras et al. 2022, Eq. 2)."""
        return self.loss.weighted_error(self.denoise, x0, labels, sigma, noise)

    def training_step(self, batch, batch_idx):
        x0, labels = batch
        if self.num_classes and not self._labels_checked:  # once: reading labels on the host syncs with the GPU
            if labels is not None and bool((labels < 0).all()):
                raise ValueError("the model is class-conditional but the data module serves no labels "
                                 "(set data.conditional: true).")
            self._labels_checked = True
        rank, world = self.rank_and_world()
        g = self.step_generator(self.global_step, x0.device)
        # sigma, noise and label dropout come from g; dropout masks are drawn in the forward pass (the backward
        # pass reuses them) from the default generators, seeded by (seed, step, rank)
        with self.seeded_rng(self.dropout_seed(self.global_step, rank), x0.device):
            loss = self.loss(self.denoise, x0, labels if self.num_classes else None, g, rank, world)
        # logged: the global-batch loss (mean over ranks; a no-op on one device), the one DDP optimises
        if self.logs_this_step():
            self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def logs_this_step(self) -> bool:
        """Whether this training step's ``self.log`` values are read: the logger writes every
        ``trainer.log_every_n_steps`` steps, and the last step's values are what ``fit`` leaves in
        ``callback_metrics`` (the final loss the CLI and the studies print).  Logging only then keeps
        Lightning's per-call bookkeeping (and, under DDP, the loss's all-reduce) out of the other steps; the
        progress bar shows the loss of the last logged step.  Outside a trainer: always."""
        if self._trainer is None:
            return True
        t, step = self.trainer, self.global_step + 1
        every = int(t.log_every_n_steps or 0)
        last = t.max_steps is not None and 0 < t.max_steps <= step
        return (every > 0 and step % every == 0) or last or bool(t.should_stop)

    # -- EMA ----------------------------------------------------------------------------------
    def ema_beta(self) -> float:
        """Per-step EMA decay from the half-life in images (Karras et al. 2022, training/training_loop.py)."""
        world = self.trainer.world_size * self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        batch = (getattr(dm, "batch_size", None) or 1) * world  # images per optimiser step, all ranks
        half = float(self.hparams.ema_halflife_kimg) * 1000.0
        if self.hparams.ema_rampup_ratio is not None:
            half = min(half, (self.global_step + 1) * batch * float(self.hparams.ema_rampup_ratio))
        return 0.5 ** (batch / max(half, 1e-8))

    @torch.no_grad()
    def update_ema(self, beta: float) -> None:
        """``ema <- beta * ema + (1 - beta) * weights`` for every parameter (one ``_foreach_lerp_``); buffers are
        copied."""
        params, buffers = self._ema_slots()
        ema_p = [e._parameters[n] for e, _, n in params]
        torch._foreach_lerp_(ema_p, [m._parameters[n] for _, m, n in params], 1.0 - beta)
        for e, m, n in buffers:
            e._buffers[n].copy_(m._buffers[n])

    def _ema_slots(self) -> tuple[list[tuple[nn.Module, nn.Module, str]], list[tuple[nn.Module, nn.Module, str]]]:
        """``(ema submodule, network submodule, name)`` of each parameter and each buffer, in ``parameters()`` /
        ``buffers()`` order: found once per (network, EMA) pair of modules (walking the module tree every step
        costs more than the update) and looked up by name at each update, so tensors that ``.to()`` or
        ``load_state_dict(assign=True)`` replace are still the ones updated."""
        cached = self.__dict__.get("_ema_slot_cache")
        if cached is not None and cached[0] is self.model and cached[1] is self.ema:
            return cached[2]

        def slots(names):
            out = []
            for name in names:
                path, _, leaf = name.rpartition(".")
                out.append((self.ema.get_submodule(path), self.model.get_submodule(path), leaf))
            return out

        found = (slots(n for n, _ in self.model.named_parameters()), slots(n for n, _ in self.model.named_buffers()))
        self.__dict__["_ema_slot_cache"] = (self.model, self.ema, found)  # outside the module tree
        return found

    def optimizer_step(self, *args, **kwargs):
        """The optimiser step, then the EMA update of that step.

        Updated here rather than in ``on_train_batch_end``, which Lightning runs *after* the callbacks' hooks:
        a checkpoint saved at step ``k`` (``ModelCheckpoint.on_train_batch_end``) then holds the EMA of step
        ``k``, so ``--ckpt_path last`` resumes with exactly the EMA an uninterrupted run has.
        """
        out = super().optimizer_step(*args, **kwargs)
        beta = self.ema_beta()
        self.update_ema(beta)
        if self.logs_this_step():
            self.log("train/ema_beta", beta)
        return out

    # -- optimiser ----------------------------------------------------------------------------
    def configure_optimizers(self):
        fused = self.device.type == "cuda"
        params = self.model.parameters()
        if self.trainable_patterns is not None:  # fine-tuning: frozen parameters stay out of the optimiser
            params = [p for p in params if p.requires_grad]
        # fused on CUDA; elsewhere the multi-tensor (foreach) AdamW, which gives the same weights as the default
        # for-loop one with far fewer kernel calls
        opt = torch.optim.AdamW(params, lr=self.hparams.lr, betas=tuple(self.hparams.betas),
                                weight_decay=self.hparams.weight_decay, fused=fused or None,
                                foreach=None if fused else True)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def lr_factor(self, step: int, total_steps: int | None = None) -> float:
        """The learning rate of optimiser step ``step`` over ``lr``: linear warm-up, then ``lr_decay`` over
        ``total_steps`` (default ``trainer.max_steps``; a loop without a Trainer passes its own)."""
        warm, decay = int(self.hparams.warmup_steps), self.hparams.get("lr_decay", "constant")
        factor = min(1.0, (step + 1) / warm) if warm > 0 else 1.0
        if total_steps is None and self._trainer is None:
            return factor  # no run length known (a loop without a Trainer passes total_steps): warm-up only
        total = int(self.trainer.max_steps if total_steps is None else total_steps)
        if decay == "cosine":
            if total <= warm:
                raise ValueError(f"lr_decay 'cosine' needs trainer.max_steps > warmup_steps ({warm}), got {total}.")
            progress = min(1.0, max(0.0, (step - warm) / (total - warm)))
            factor *= 0.5 * (1.0 + math.cos(math.pi * progress))
        return factor

    # -- validation: a fixed-seed sample grid with the EMA denoiser -------------------------
    def sample(self, seeds, labels=None, sampler: str | None = None, steps: int | None = None, **kw) -> Tensor:
        from .sampling import sample

        return sample(self.ema, self.kernel, list(seeds), self.image_shape, sampler=sampler or self.hparams.val_sampler,
                      steps=steps or self.hparams.val_steps, labels=labels, device=self.device, **kw)

    def validation_step(self, batch, batch_idx):
        seeds, labels = batch
        lab = labels.to(self.device) if self.num_classes else None
        self._val_images.append(self.sample(seeds.tolist(), labels=lab).cpu())
        self._val_seeds.append(torch.as_tensor(seeds).reshape(-1).cpu())

    def on_validation_epoch_end(self):
        if not self._val_images:
            return
        images, seeds = torch.cat(self._val_images), torch.cat(self._val_seeds)
        self._val_images.clear()
        self._val_seeds.clear()
        if self.trainer.world_size > 1:  # under DDP each rank sampled its share of the seeds: gather them all
            images = self.all_gather(images.to(self.device)).flatten(0, 1).cpu()
            seeds = self.all_gather(seeds.to(self.device)).flatten().cpu()
            seeds, order = torch.sort(seeds, stable=True)
            first = torch.ones_like(seeds, dtype=torch.bool)
            first[1:] = seeds[1:] != seeds[:-1]  # the distributed sampler pads with repeated seeds
            images = images[order[first]]
        if self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        from .viz import save_grid

        out = Path(self.trainer.default_root_dir) / "samples" / f"step_{self.global_step:07d}.png"
        save_grid(images, out)
        self.last_grid_path = out
        logger = self.logger
        if logger is not None and hasattr(logger, "log_image"):
            logger.log_image("val/samples", [str(out)], step=self.global_step)

    # -- checkpoints --------------------------------------------------------------------------
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resuming (``trainer.fit(ckpt_path=...)``): one sentence unless the checkpoint fits this model
        (``check_compatible``), before Lightning loads its state dict (a page of size mismatches otherwise)."""
        path = (getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None) or "checkpoint"
        meta = checkpoint.get(CKPT_KEY)
        if not isinstance(meta, dict):
            raise ValueError(f"ckpt_path {path} was not written by lightning_repro's DiffusionModule "
                             f"(no '{CKPT_KEY}' metadata).")
        self.check_compatible(meta, str(path), what="ckpt_path")
        if meta.get("init_from") == self.hparams.get("init_from") and "init_from_sha256" in meta:
            self.init_provenance = {k: meta[k] for k in ("init_from_sha256", "init_from_format") if k in meta}

    def run_config(self, dm=None) -> dict[str, Any]:
        """The keys every run carries (W&B config, checkpoint metadata)."""
        if dm is None and self._trainer is not None:
            dm = getattr(self.trainer, "datamodule", None)
        cfg = {"arch": self.arch, "kernel": self.kernel.name, "precond": self.precond_name,
               "image_shape": list(self.image_shape), "num_classes": self.num_classes, "seed": int(self.hparams.seed)}
        trainable, total = self.parameter_counts()
        cfg.update(trainable_params=trainable, total_params=total)
        if self.hparams.get("init_from"):
            cfg.update(init_from=str(self.hparams.init_from), trainable=self.trainable_patterns,
                       **self.init_provenance)  # SHA-256 / format of the file (once loaded, or resumed)
        if dm is not None and hasattr(dm, "describe"):
            d = dm.describe()
            cfg.update(size=d["size"], subset_seed=d["subset_seed"], source=d["source"], data=self.data_kwargs(dm))
        if self.hparams.get("regression_teacher"):
            cfg.update(regression_teacher=str(self.hparams.regression_teacher),
                       regression_teacher_provenance=getattr(self, "regression_teacher_provenance", None))
        return cfg

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        hparams = {k: v for k, v in self.hparams.items() if not k.startswith("_")}
        checkpoint[CKPT_KEY] = {"class_path": self.class_path(), "hparams": hparams,
                                "kernel": self.kernel.config(), **self.run_config()}
