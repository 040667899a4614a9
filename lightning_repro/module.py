"""``DiffusionModule``: network + kernel + preconditioning + loss, trained with Lightning.

Training (Karras et al. 2022, Eq. 2 and Sec. 5): draw ``sigma`` from the kernel's training-noise
distribution, ``n ~ N(0, I)``, and minimise ``lambda(sigma) || D(x_0 + sigma n; sigma) - x_0 ||^2``.
The EMA of the weights (EDM's half-life in thousands of images, with ramp-up) is the model used for all
sampling and evaluation.  Presets (DESIGN.md): ``DDPM`` (Ho et al. 2020 U-Net), ``EDM`` (DDPM++ U-Net of
Song et al. 2021 as in Karras et al. 2022), ``UViT`` (Bao et al. 2023) and ``DiT`` (Peebles & Xie 2023),
each with any kernel: ``vp``, ``vp_discrete``, ``subvp``, ``ve``, ``edm``.

The training draws of step ``k`` are functions of ``(seed, k)``: every rank draws sigma and the noise of the
whole global batch (``batch_size * world_size`` rows) from a generator seeded by ``(seed, k)`` and keeps its own
rows ``[rank * batch_size, (rank + 1) * batch_size)``, the rows of the images ``SubsetDataModule`` serves it;
dropout draws from the default generators, which each step seeds from ``(seed, k, rank)`` inside a fork of the
global RNG (``dropout_seed``, ``seeded_rng``: nothing outside the step is disturbed).  So a resumed run
(``--ckpt_path last``) repeats exactly what an uninterrupted one does, dropout on or off, and a DDP run on ``W``
ranks with ``batch_size = B / W`` follows the trajectory of one process with ``batch_size = B`` (the DDP gradient
is the mean of the ranks' means, i.e. the global mean) up to float round-off — dropout masks excepted, which are
drawn per rank (a mask is one draw for the rank's whole batch).  A resumed checkpoint must hold the configured
architecture, network settings, image shape, classes, kernel and preconditioning (``check_compatible``, the
check ``init_from`` makes too), else one sentence.

Fine-tuning (Zhang et al. 2024, Sec. 4.3 / Fig. 11 / App. G: attention-only fine-tuning of a pretrained model).
``init_from`` names a lightning_repro checkpoint of the same architecture; its *EMA* weights initialise both the
trained weights and the EMA at the start of ``fit`` (``on_fit_start``), so (1) rebuilding a fine-tuned checkpoint
(``module_from_checkpoint``, ``load_denoiser``, ``load_from_checkpoint``) never reads the ``init_from`` file, its
own ``state_dict`` wins, and (2) a resumed fit (``--ckpt_path last``) keeps the resumed weights and does not read
it either.  ``trainable`` lists ``fnmatch`` patterns over the network's parameter names (as in ``nets/``, e.g.
``blocks.0.attn.qkv.weight``; ``model.net.<name>`` matches too): the others get ``requires_grad=False`` and stay
out of the optimiser (the EMA still averages every parameter; frozen ones stay equal to their initial value).
``None`` trains everything when training from scratch and the family's attention layers (``attention_patterns``)
when ``init_from`` is set; ``["*"]`` trains everything.  From the CLI::

    python train.py fit --config configs/experiments/digits_dit.yaml \
        --model.init_args.init_from runs/pretrain/checkpoints/last.ckpt [--model.init_args.trainable '["*"]']

(``--model.init_from`` works as well: jsonargparse accepts the ``init_args`` level left out.)  A different
architecture, kernel or preconditioning, mismatched parameter shapes or names, a pattern matching no parameter
and a missing file are each one sentence.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from contextlib import contextmanager, nullcontext
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from .kernels import Kernel, VPKernel, get_kernel
from .precond import Precond, get_precond

__all__ = ["DiffusionModule", "DDPM", "EDM", "UViT", "DiT", "load_denoiser", "load_checkpoint", "ARCHS",
           "default_precond"]

CKPT_KEY = "lightning_repro"


def default_precond(kernel: Kernel) -> str:
    """EDM kernel -> EDM preconditioning; discrete VP -> DDPM timesteps; other kernels -> epsilon-prediction."""
    if kernel.name == "edm":
        return "edm"
    if isinstance(kernel, VPKernel) and kernel.discrete:
        return "ddpm"
    return "eps"


class DiffusionModule(L.LightningModule):
    """Base LightningModule; subclasses define ``build_net()``.

    Args:
        kernel: ``vp`` | ``vp_discrete`` | ``subvp`` | ``ve`` | ``edm``.
        kernel_kwargs: constants of the kernel (e.g. ``{"sigma_max": 100}``).
        precond: ``eps`` | ``ddpm`` | ``x0`` | ``v`` | ``edm``; default follows the kernel.
        image_shape: C, H, W (linked from the data module by the CLI).
        num_classes: 0 for unconditional (linked from ``data.conditional``).
        lr, weight_decay, betas, warmup_steps: AdamW with linear warm-up.
        ema_halflife_kimg, ema_rampup_ratio: EMA half-life in thousands of images (Karras et al. 2022).
        label_dropout: probability of replacing the label by the null class (classifier-free guidance).
        val_sampler, val_steps: deterministic sampler for the validation grid.
        seed: seed of the training noise stream (defaults to 0; the CLI links ``seed_everything``).
        channels_last, compile: speed options for GPUs.
        init_from: a lightning_repro checkpoint of the same architecture whose EMA weights initialise the model
            and the EMA at the start of ``fit`` (fine-tuning; see the module docstring).
        trainable: ``fnmatch`` patterns over the network's parameter names selecting what is trained (the rest
            is frozen); None: everything from scratch, ``attention_patterns`` with ``init_from``; ``["*"]``: all.
    """

    arch: str = "base"
    #: ``fnmatch`` patterns of the attention layers' parameters (names relative to the network): what
    #: ``trainable`` means by default when fine-tuning from ``init_from`` (paper App. G).
    attention_patterns: tuple[str, ...] = ()
    #: network settings that may differ between an ``init_from`` checkpoint and the model (not architecture)
    init_free_keys: tuple[str, ...] = ("dropout",)

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
    ):
        super().__init__()
        self.save_hyperparameters()
        self.kernel = get_kernel(kernel, **(kernel_kwargs or {}))
        self.image_shape = tuple(int(v) for v in image_shape)
        self.num_classes = int(num_classes)
        self.precond_name = precond or default_precond(self.kernel)
        net = self.build_net()
        self.model: Precond = get_precond(self.precond_name, net, self.kernel)
        self.ema: Precond = copy.deepcopy(self.model).requires_grad_(False).eval()
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
        self.__dict__["_forward"] = torch.compile(self.model) if compile else self.model

    # -- to be defined by presets -------------------------------------------------------------
    def build_net(self) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} must define build_net().")

    def net_kwargs(self) -> dict[str, Any]:
        c, h, w = self.image_shape
        if h != w:
            raise ValueError(f"image_shape {self.image_shape}: only square images are supported.")
        return dict(img_resolution=h, in_channels=c, out_channels=c, num_classes=self.num_classes)

    # -- the loss -----------------------------------------------------------------------------
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

    def draw_noise(self, x0: Tensor, labels: Tensor, generator: torch.Generator, rank: int = 0, world_size: int = 1):
        """Training draws of one step: ``sigma`` (B,), ``noise`` like x0, labels after dropout.

        The draws are made for the whole global batch of ``B * world_size`` rows and rows
        ``[rank * B, (rank + 1) * B)`` are returned, so each image's draws depend on its global position only.
        """
        b, world = x0.shape[0], int(world_size)
        if not 0 <= int(rank) < world:
            raise ValueError(f"rank must lie in [0, {world - 1}] for world_size={world}, got {rank}.")
        rows = slice(int(rank) * b, (int(rank) + 1) * b)
        sigma = self.kernel.sample_sigma(b * world, generator=generator, device=x0.device)[rows]
        noise = torch.randn((b * world, *x0.shape[1:]), generator=generator, device=x0.device, dtype=x0.dtype)[rows]
        p = float(self.hparams.label_dropout)
        if p > 0 and self.num_classes:
            drop = torch.rand(b * world, generator=generator, device=x0.device)[rows] < p
            labels = torch.where(drop, torch.full_like(labels, -1), labels)
        return sigma, noise, labels

    def loss_fn(self, x0: Tensor, labels: Tensor | None, sigma: Tensor, noise: Tensor) -> Tensor:
        """``mean( lambda(sigma) * || D(x0 + sigma n; sigma) - x0 ||^2 )`` (Karras et al. 2022, Eq. 2)."""
        x = x0 + sigma.view(-1, 1, 1, 1).to(x0.dtype) * noise
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        D = self._forward(x, sigma, labels if self.num_classes else None)
        w = self.kernel.loss_weight(sigma.double()).float().view(-1, 1, 1, 1)
        return (w * (D.float() - x0.float()) ** 2).mean()

    def training_step(self, batch, batch_idx):
        x0, labels = batch
        if self.num_classes and not self._labels_checked:  # once: reading labels on the host syncs with the GPU
            if labels is not None and bool((labels < 0).all()):
                raise ValueError("the model is class-conditional but the data module serves no labels "
                                 "(set data.conditional: true).")
            self._labels_checked = True
        rank, world = self.rank_and_world()
        g = self.step_generator(self.global_step, x0.device)
        sigma, noise, labels = self.draw_noise(x0, labels, g, rank, world)
        # dropout masks are drawn in the forward pass (the backward pass reuses them): seeded by (seed, step, rank)
        with self.seeded_rng(self.dropout_seed(self.global_step, rank), x0.device):
            loss = self.loss_fn(x0, labels, sigma, noise)
        # logged: the global-batch loss (mean over ranks; a no-op on one device), the one DDP optimises
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        return loss

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
        ema_p = list(self.ema.parameters())
        p = [q.detach() for q in self.model.parameters()]
        torch._foreach_lerp_(ema_p, p, 1.0 - beta)
        for eb, b in zip(self.ema.buffers(), self.model.buffers()):
            eb.copy_(b)

    def optimizer_step(self, *args, **kwargs):
        """The optimiser step, then the EMA update of that step.

        Updated here rather than in ``on_train_batch_end``, which Lightning runs *after* the callbacks' hooks:
        a checkpoint saved at step ``k`` (``ModelCheckpoint.on_train_batch_end``) then holds the EMA of step
        ``k``, so ``--ckpt_path last`` resumes with exactly the EMA an uninterrupted run has.
        """
        out = super().optimizer_step(*args, **kwargs)
        beta = self.ema_beta()
        self.update_ema(beta)
        self.log("train/ema_beta", beta)
        return out

    # -- optimiser ----------------------------------------------------------------------------
    def configure_optimizers(self):
        fused = self.device.type == "cuda"
        params = self.model.parameters()
        if self.trainable_patterns is not None:  # fine-tuning: frozen parameters stay out of the optimiser
            params = [p for p in params if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.hparams.lr, betas=tuple(self.hparams.betas),
                                weight_decay=self.hparams.weight_decay, fused=fused or None)
        warm = int(self.hparams.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm > 0 else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

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

    # -- fine-tuning: init_from + trainable (paper Sec. 4.3, App. G) ---------------------------
    def network_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of the trained network; names relative to it (``blocks.0.attn.qkv.weight``)."""
        out = []
        for name, p in self.model.named_parameters():
            out.append((name[4:] if name.startswith("net.") else name, p))
        return out

    def _resolve_trainable(self, trainable, init_from) -> list[str] | None:
        if trainable is None:
            if not init_from:
                return None  # training from scratch: every parameter, exactly as without fine-tuning support
            if not self.attention_patterns:
                raise ValueError(f"{type(self).__name__} defines no attention layers to fine-tune by default; "
                                 f"set trainable (e.g. ['*'] for all parameters).")
            return list(self.attention_patterns)
        if isinstance(trainable, str):
            trainable = [trainable]
        pats = list(trainable)
        if not pats or not all(isinstance(p, str) and p for p in pats):
            raise ValueError(f"trainable must be a non-empty list of parameter-name patterns (e.g. ['*.attn.*'] or "
                             f"['*']), got {trainable!r}.")
        return pats

    @staticmethod
    def _matches(name: str, pattern: str) -> bool:
        return fnmatchcase(name, pattern) or fnmatchcase(f"model.net.{name}", pattern)

    def _freeze_untrainable(self) -> None:
        """``requires_grad=False`` on every network parameter no ``trainable`` pattern selects (one sentence on a
        pattern that matches nothing).  Parameters the network itself keeps fixed (DiT's ``pos_embed``) stay fixed."""
        pats = self.trainable_patterns
        if pats is None:
            return
        named = self.network_parameters()
        for pat in pats:
            if not any(self._matches(n, pat) for n, _ in named):
                hint = [n for n in (n for n, _ in named) if any(self._matches(n, a) for a in self.attention_patterns)]
                hint = (hint or [n for n, _ in named])[:3]
                extra = ""
                if self.hparams.get("init_from") and self.hparams.get("trainable") is None:
                    extra = " (the default attention patterns: this configuration has no attention layers)"
                raise ValueError(f"trainable pattern {pat!r} matches no parameter of the {type(self).__name__} "
                                 f"network{extra}; names look like {', '.join(hint)} (see network_parameters()).")
        selected = 0
        for name, p in named:
            keep = p.requires_grad and any(self._matches(name, pat) for pat in pats)
            p.requires_grad_(keep)
            selected += int(keep)
        if not selected:
            raise ValueError(f"trainable patterns {pats} select only parameters the {type(self).__name__} network "
                             f"keeps fixed; nothing would be trained.")

    def parameter_counts(self) -> tuple[int, int]:
        """``(trainable, total)`` numbers of network parameters (elements)."""
        params = list(self.model.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def trainable_summary(self) -> str:
        """``"trainable N / total M parameters (x%)"``."""
        n, m = self.parameter_counts()
        return f"trainable {n:,} / total {m:,} parameters ({100.0 * n / max(m, 1):.2f}%)"

    def check_compatible(self, meta: dict[str, Any], path: str, what: str = "init_from") -> None:
        """One sentence unless checkpoint ``path`` (metadata ``meta``) holds the same architecture, network settings
        (but ``init_free_keys``), kernel and preconditioning; ``what="ckpt_path"`` (resuming) also needs the same
        image shape and number of classes.  ``what`` names the option in the sentence."""
        cls = type(self)
        mine = f"{cls.__module__}.{cls.__qualname__}"
        theirs = str(meta.get("class_path", "?"))
        needs = "init_from needs" if what == "init_from" else "resuming needs"
        if meta.get("arch") != self.arch or theirs.rsplit(".", 1)[-1] != cls.__qualname__:
            raise ValueError(f"{what} {path} holds a {meta.get('arch')!r} model ({theirs}), but this model is "
                             f"{self.arch!r} ({mine}); {needs} a checkpoint of the same architecture.")

        def norm(v):
            return json.loads(json.dumps(v, default=str))  # tuples -> lists, as a config file would give them

        hp = meta.get("hparams") or {}
        net_cfg = getattr(self, "_net_cfg", {})
        diffs = [f"{k}={norm(hp.get(k))!r} (this model: {norm(v)!r})" for k, v in net_cfg.items()
                 if k not in self.init_free_keys and norm(hp.get(k)) != norm(v)]
        if diffs:
            raise ValueError(f"{what} {path} has a different {cls.__qualname__} network: {'; '.join(diffs)}; "
                             f"{needs} the same architecture settings.")
        if what != "init_from":
            for key, own in (("image_shape", list(self.image_shape)), ("num_classes", self.num_classes)):
                if norm(meta.get(key)) != own:
                    raise ValueError(f"{what} {path} was trained with {key} {norm(meta.get(key))!r}, but this model "
                                     f"has {own!r} (from the data module); {needs} the same data shape.")
        for key, own in (("kernel", self.kernel.name), ("precond", self.precond_name)):
            if meta.get(key) != own:
                raise ValueError(f"{what} {path} was trained with {key} {meta.get(key)!r}, but this model uses "
                                 f"{own!r}; {'fine-tuning' if what == 'init_from' else 'resuming'} needs the same "
                                 f"kernel and preconditioning (kernel_kwargs may differ).")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resuming (``trainer.fit(ckpt_path=...)``): one sentence unless the checkpoint fits this model
        (``check_compatible``), before Lightning loads its state dict (a page of size mismatches otherwise)."""
        path = (getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None) or "checkpoint"
        meta = checkpoint.get(CKPT_KEY)
        if not isinstance(meta, dict):
            raise ValueError(f"ckpt_path {path} was not written by lightning_repro's DiffusionModule "
                             f"(no '{CKPT_KEY}' metadata).")
        self.check_compatible(meta, str(path), what="ckpt_path")

    @torch.no_grad()
    def load_init_weights(self, path: str | os.PathLike | None = None) -> None:
        """Copy the EMA weights of checkpoint ``path`` (default: ``init_from``) into both the model and the EMA.

        Called by ``on_fit_start`` (not when resuming).  Raises one sentence on a missing / unreadable file, a
        different architecture, or parameters whose names or shapes differ (naming the first few).
        """
        path = str(path if path is not None else self.hparams.init_from)
        try:
            ckpt = load_checkpoint(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"init_from checkpoint {path} does not exist.") from None
        except ValueError as err:
            raise ValueError(f"init_from: {err}") from None
        self.check_compatible(ckpt[CKPT_KEY], path)
        state = {k[4:]: v for k, v in ckpt["state_dict"].items() if k.startswith("ema.")}
        own = self.ema.state_dict()
        shape = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                 if k in state and state[k].shape != v.shape]
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]

        def first(keys: list[str]) -> str:
            return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

        if shape:
            raise ValueError(f"init_from {path}: {len(shape)} parameter(s) differ in shape from this model "
                             f"(checkpoint vs model): {first(shape)}.")
        if missing or unexpected:
            parts = ([f"missing {first(missing)}"] if missing else []) + (
                [f"unexpected {first(unexpected)}"] if unexpected else [])
            raise ValueError(f"init_from {path}: parameter names differ from this model: {'; '.join(parts)}.")
        self.model.load_state_dict(state)
        self.ema.load_state_dict(state)
        self._init_loaded = True

    def on_fit_start(self) -> None:
        """Fine-tuning: load ``init_from`` (unless this fit resumes a checkpoint) and print the trainable count."""
        resuming = self._trainer is not None and bool(self.trainer.ckpt_path)
        if self.hparams.get("init_from") and not self._init_loaded and not resuming:
            self.load_init_weights()
        if self.trainable_patterns is not None and (self._trainer is None or self.trainer.is_global_zero):
            src = f"from {self.hparams.init_from}" if self.hparams.get("init_from") else "from scratch"
            print(f"fine-tuning {src}: {self.trainable_summary()}; trainable patterns {self.trainable_patterns}",
                  flush=True)

    # -- checkpoints --------------------------------------------------------------------------
    def run_config(self, dm=None) -> dict[str, Any]:
        """The keys every run carries (W&B config, checkpoint metadata)."""
        if dm is None and self._trainer is not None:
            dm = getattr(self.trainer, "datamodule", None)
        cfg = {"arch": self.arch, "kernel": self.kernel.name, "precond": self.precond_name,
               "image_shape": list(self.image_shape), "num_classes": self.num_classes, "seed": int(self.hparams.seed)}
        trainable, total = self.parameter_counts()
        cfg.update(trainable_params=trainable, total_params=total)
        if self.hparams.get("init_from"):
            cfg.update(init_from=str(self.hparams.init_from), trainable=self.trainable_patterns)
        if dm is not None and hasattr(dm, "describe"):
            d = dm.describe()
            cfg.update(size=d["size"], subset_seed=d["subset_seed"], source=d["source"], data={k: v for k, v in dm.hparams.items() if not k.startswith("_")})
        return cfg

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        cls = type(self)
        hparams = {k: v for k, v in self.hparams.items() if not k.startswith("_")}
        checkpoint[CKPT_KEY] = {"class_path": f"{cls.__module__}.{cls.__qualname__}", "hparams": hparams,
                                "kernel": self.kernel.config(), **self.run_config()}


def _unet_kwargs(model_channels, channel_mult, num_blocks, attn_resolutions, dropout) -> dict[str, Any]:
    return dict(model_channels=model_channels, channel_mult=tuple(channel_mult), num_blocks=num_blocks,
                attn_resolutions=tuple(attn_resolutions), dropout=dropout)


class EDM(DiffusionModule):
    """DDPM++ U-Net (Song et al. 2021) as configured by EDM (Karras et al. 2022, ``ddpmpp``).

    CIFAR-10: ``model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16]`` is the
    55,732,739-parameter network; the paper's own runs use ``model_channels=64`` (13,956,355).
    """

    arch = "edm"
    attention_patterns = ("*.qkv.*", "*.proj.*", "*.norm2.*")  # SongUNetBlock self-attention (+ its GroupNorm)

    def __init__(self, model_channels: int = 128, channel_mult: list[int] = (2, 2, 2), num_blocks: int = 4,
                 attn_resolutions: list[int] = (16,), dropout: float = 0.10, kernel: str = "edm", **kwargs):
        self._net_cfg = _unet_kwargs(model_channels, channel_mult, num_blocks, attn_resolutions, dropout)
        super().__init__(kernel=kernel, **kwargs)

    def build_net(self) -> nn.Module:
        from .nets.edm_unet import SongUNet

        return SongUNet(**self.net_kwargs(), **self._net_cfg)


class DDPM(DiffusionModule):
    """The U-Net of Ho et al. 2020 (CIFAR-10: 128 channels, [1, 2, 2, 2], 2 blocks, attention at 16; 35.7M)."""

    arch = "ddpm"
    attention_patterns = ("*.attn.*", "mid_attn.*")  # DDPMAttnBlock: norm, qkv, proj_out

    def __init__(self, model_channels: int = 128, channel_mult: list[int] = (1, 2, 2, 2), num_blocks: int = 2,
                 attn_resolutions: list[int] = (16,), dropout: float = 0.10, kernel: str = "vp", **kwargs):
        self._net_cfg = _unet_kwargs(model_channels, channel_mult, num_blocks, attn_resolutions, dropout)
        super().__init__(kernel=kernel, **kwargs)

    def build_net(self) -> nn.Module:
        from .nets.ddpm_unet import DDPMUNet

        return DDPMUNet(**self.net_kwargs(), **self._net_cfg)


class UViT(DiffusionModule):
    """U-ViT (Bao et al. 2023); CIFAR-10 U-ViT-S/2: patch 2, depth 12 (13 blocks), width 512, 8 heads."""

    arch = "uvit"
    attention_patterns = ("*.attn.*",)  # qkv + proj of every transformer block

    def __init__(self, patch_size: int = 2, embed_dim: int = 512, depth: int = 12, num_heads: int = 8,
                 mlp_ratio: float = 4.0, kernel: str = "vp", **kwargs):
        self._net_cfg = dict(patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                             mlp_ratio=mlp_ratio)
        super().__init__(kernel=kernel, **kwargs)

    def build_net(self) -> nn.Module:
        from .nets.uvit import UViT as UViTNet

        return UViTNet(**self.net_kwargs(), **self._net_cfg)


class DiT(DiffusionModule):
    """DiT (Peebles & Xie 2023) in pixel space; DiT-S/2: patch 2, depth 12, width 384, 6 heads."""

    arch = "dit"
    attention_patterns = ("*.attn.*",)  # qkv + proj of every DiT block

    def __init__(self, patch_size: int = 2, hidden_size: int = 384, depth: int = 12, num_heads: int = 6,
                 mlp_ratio: float = 4.0, kernel: str = "edm", **kwargs):
        self._net_cfg = dict(patch_size=patch_size, hidden_size=hidden_size, depth=depth, num_heads=num_heads,
                             mlp_ratio=mlp_ratio)
        super().__init__(kernel=kernel, **kwargs)

    def build_net(self) -> nn.Module:
        from .nets.dit import DiT as DiTNet

        return DiTNet(**self.net_kwargs(), **self._net_cfg)


ARCHS: dict[str, type[DiffusionModule]] = {"ddpm": DDPM, "edm": EDM, "uvit": UViT, "dit": DiT}


# -- loading ------------------------------------------------------------------------------------
def load_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint safely (``weights_only=True``) with one clear sentence on failure (``mmap``: tensors are
    mapped, not read, e.g. to check a file cheaply)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # truncated zip, pickle errors, ...
        reason = (str(err).splitlines() or [""])[0].split(". ")[0].rstrip(".")  # torch's first sentence
        raise ValueError(f"checkpoint {path} could not be read (truncated or not a lightning_repro checkpoint?): "
                         f"{type(err).__name__}: {reason}.") from None
    if not isinstance(ckpt, dict) or CKPT_KEY not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"checkpoint {path} was not written by lightning_repro's DiffusionModule "
                         f"(no '{CKPT_KEY}' metadata).")
    return ckpt


def preset_class(class_path: str, path: str | os.PathLike = "") -> type[DiffusionModule]:
    """The registered preset a checkpoint's ``class_path`` names; nothing outside ``ARCHS`` is imported or called.

    A checkpoint is data: its metadata may only *name* one of the suite's presets by its full class path
    (``lightning_repro.module.EDM``); any other name is one sentence, never an import.
    """
    for cls in ARCHS.values():
        if class_path == f"{cls.__module__}.{cls.__qualname__}":
            return cls
    valid = ", ".join(f"{c.__module__}.{c.__qualname__}" for c in ARCHS.values())
    raise ValueError(f"checkpoint {path} names class {class_path!r}, which is not a lightning_repro preset "
                     f"({valid}); it is refused rather than imported.")


def module_from_checkpoint(path: str | os.PathLike, map_location="cpu") -> DiffusionModule:
    """Rebuild the DiffusionModule of a checkpoint (no training state) with its weights."""
    ckpt = load_checkpoint(path)
    meta = ckpt[CKPT_KEY]
    cls = preset_class(str(meta.get("class_path")), path)
    hparams = meta.get("hparams")
    if not isinstance(hparams, dict) or not all(isinstance(k, str) for k in hparams):
        raise ValueError(f"checkpoint {path} has no hyperparameter mapping in its '{CKPT_KEY}' metadata.")
    try:
        module = cls(**hparams)
    except TypeError as err:
        raise ValueError(f"checkpoint {path}: its hyperparameters do not fit {cls.__qualname__}: {err}.") from None
    module.load_state_dict(ckpt["state_dict"])
    module.checkpoint_meta = meta
    return module.to(map_location).eval()


def load_denoiser(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Precond, Kernel]:
    """Checkpoint path -> (the EMA ``Denoiser`` in eval mode, its kernel)."""
    module = module_from_checkpoint(path, device)
    den = module.ema.eval().requires_grad_(False)
    den.checkpoint_meta = module.checkpoint_meta  # image_shape, num_classes, data config, ...
    return den, module.kernel


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()
