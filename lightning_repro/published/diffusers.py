"""diffusers pipelines as Denoisers in the EDM variable (Karras et al. 2022, App. B.2; Song, Meng & Ermon 2021).

A discrete schedule ``alpha_bar_t`` (DDPM / DDIM / PNDM / DPM-Solver multistep scheduler configs) is a VP kernel:
``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)`` and ``x = x_vp / sqrt(alpha_bar_t)`` (``DiffusersKernel``).  Its
native grid is the scheduler's own ``set_timesteps`` spacing (then DDIM's final ``alpha_bar``), so the suite's Euler
sampler on it is DDIM (eta = 0) and its DPM-Solver++ is the scheduler's.  ``UNetDenoiser`` turns the network's
epsilon / v / x0 output into ``x0_hat``; a text-to-image UNet (Stable Diffusion) is conditioned on the prompt's CLIP
embedding (label 0) or the empty prompt's (label -1, the null class of classifier-free guidance) and works in the
VAE's latent space; ``LatentDecoder`` maps final latents to images.  A consistency-model pipeline
(CMStochasticIterativeScheduler) is ``ConsistencyDenoiser`` on the EDM kernel: its one-step sample is Euler, 1 step.
A DiT pipeline (transformer/ + vae/) is a class-conditional latent ``UNetDenoiser`` whose label -1 maps to its null class.  Weights load through diffusers' / transformers'
``from_pretrained`` (safetensors, or ``torch.load(weights_only=True)``), never running code from a file.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..kernels import KERNELS, VPKernel, append_zero
from ..precond import as_sigma_batch

__all__ = [
    "DiffusersKernel",
    "UNetDenoiser",
    "ConsistencyDenoiser",
    "LatentDecoder",
    "PipelineSpec",
    "PipelineFolder",
    "parse_spec",
    "locate",
    "read_folder",
    "load_denoiser",
    "load_decoder",
    "VAEFolder",
    "read_vae",
    "DDIM_FAMILY",
    "COMPONENTS",
]

DDIM_FAMILY = ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler")  # sampled on DDIM's timestep spacing
_DPM = "DPMSolverMultistepScheduler"
CONSISTENCY = "CMStochasticIterativeScheduler"  # one-step consistency models (EDM kernel, ``--steps 1``)
_UNSUPPORTED = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas")
COMPONENTS = ("scheduler", "unet", "transformer", "vae", "text_encoder", "tokenizer")  # the pipeline folders read
_PREDICTIONS = ("epsilon", "v_prediction", "sample")
_TRANSFORMERS = ("DiTTransformer2DModel", "Transformer2DModel")  # DiT pipelines (class-conditional, latent)


def _scheduler(config: dict[str, Any]):
    """A diffusers scheduler for ``config`` (DDPM / PNDM configs get DDIM, their deterministic counterpart)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    name = config.get("_class_name", "DDIMScheduler")
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    if name == _DPM:
        return DPMSolverMultistepScheduler.from_config(cfg)
    if name in DDIM_FAMILY:
        return DDIMScheduler.from_config(cfg)
    raise ValueError(
        f"scheduler {name!r} is not supported; a diffusers pipeline needs one of {', '.join((*DDIM_FAMILY, _DPM))}."
    )


class DiffusersKernel(VPKernel):
    """The VP kernel of a diffusers scheduler's ``alpha_bar`` table; its native grid is the scheduler's spacing."""

    name = "diffusers"

    def __init__(self, scheduler: dict[str, Any] | None = None):
        config = dict(scheduler or {"_class_name": "DDIMScheduler"})
        bad = [k for k in _UNSUPPORTED if config.get(k)]
        if bad:
            raise ValueError(
                f"the scheduler config sets {bad[0]}; the suite's grid follows the scheduler's timestep spacing only, "
                "so drop that option and choose the sigma grid with --grid (e.g. --grid karras)."
            )
        abar = _scheduler(config).alphas_cumprod.to(torch.float64)  # diffusers' float32 table, as its steps use it
        super().__init__(discrete=True, num_timesteps=len(abar))
        self._neg_log_abar = -torch.log(abar)
        self.scheduler = config

    def sigmas(self, steps: int) -> Tensor:
        """``sigma`` at the scheduler's ``set_timesteps(steps)``, then its final level (DDIM: 0 or ``sigma(0)``)."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}.")
        sched = _scheduler(self.scheduler)
        sched.set_timesteps(steps)
        sig = self.sigma(sched.timesteps.to(torch.float64))
        if self.scheduler.get("_class_name") == _DPM:
            last_zero = sched.config.final_sigmas_type == "zero"
        else:
            last_zero = bool(sched.config.set_alpha_to_one)
        return append_zero(sig) if last_zero else torch.cat([sig, self.sigma(torch.zeros(1, dtype=torch.float64))])

    def start_scale(self, sigmas: Tensor) -> float:
        """DDIM starts from ``z`` in the VP variable at its first timestep: ``x_T = sqrt(1 + sigma_0^2) z``."""
        return math.sqrt(1.0 + float(sigmas[0]) ** 2)

    def config(self) -> dict:
        return {"name": self.name, "scheduler": self.scheduler}

    def __repr__(self) -> str:
        return f"DiffusersKernel({self.scheduler.get('_class_name')}, T={self.num_timesteps})"


KERNELS.setdefault(DiffusersKernel.name, DiffusersKernel)


def _timesteps(kernel: VPKernel, sigma: Tensor) -> Tensor:
    """Network times of ``sigma``; grid values of the table map back to its integer timesteps (round-off snapped)."""
    t = kernel.t_of_sigma(sigma.to(torch.float64))
    r = t.round()
    return torch.where((t - r).abs() < 1e-6, r, t)


class UNetDenoiser(nn.Module):
    """A diffusers UNet as ``D(x, sigma, labels) -> x0_hat`` in the EDM variable (``x_vp = x / sqrt(1 + sigma^2)``).

    ``context``: (cond, null) text embeddings of a UNet2DConditionModel (label 0 / -1; None labels: cond);
    ``null_label``: the class index a DiT transformer's label -1 (null class) maps to (its ``num_embeds_ada_norm``).
    """

    def __init__(self, unet: nn.Module, kernel: VPKernel, prediction_type: str,
                 context: tuple[Tensor, Tensor] | None = None, null_label: int | None = None):  # fmt: skip
        super().__init__()
        self.null_label = null_label
        if prediction_type not in _PREDICTIONS:
            raise ValueError(f"prediction_type {prediction_type!r} is not one of {', '.join(_PREDICTIONS)}.")
        self.unet, self.kernel, self.prediction_type = unet.eval().requires_grad_(False), kernel, prediction_type
        self.context = context

    def _encoder_states(self, labels: Tensor | None, n: int) -> Tensor:
        cond, null = self.context
        if labels is None:
            return cond.expand(n, -1, -1)
        null_mask = (labels.reshape(-1) < 0).to(cond.device)[:, None, None]
        return torch.where(null_mask, null, cond)

    def forward(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None) -> Tensor:
        sigma = as_sigma_batch(sigma, x).to(torch.float64)
        shape = (-1, *([1] * (x.ndim - 1)))
        s2 = (1.0 + sigma**2).reshape(shape)
        x_vp = x * s2.rsqrt().to(x.dtype)
        if self.context is not None:
            kw = {"encoder_hidden_states": self._encoder_states(labels, x.shape[0])}
        elif self.null_label is not None and labels is not None:  # DiT: label -1 is its null class embedding
            kw = {"class_labels": torch.where(labels < 0, self.null_label, labels)}
        else:  # a class-conditional UNet2DModel takes its labels
            kw = {"class_labels": labels} if getattr(self.unet.config, "num_class_embeds", None) and labels is not None else {}
        out = self.unet(x_vp, _timesteps(self.kernel, sigma).to(x.dtype), **kw).sample[:, : x.shape[1]].to(x.dtype)
        sig = sigma.reshape(shape)
        if self.prediction_type == "epsilon":  # x0 = (x_vp - sqrt(1 - abar) eps) / sqrt(abar) = x - sigma eps
            return x - sig.to(x.dtype) * out
        if self.prediction_type == "v_prediction":  # x0 = sqrt(abar) x_vp - sqrt(1 - abar) v
            return x / s2.to(x.dtype) - (sig * s2.rsqrt()).to(x.dtype) * out
        return out


class ConsistencyDenoiser(nn.Module):
    """A consistency model's UNet (Song et al. 2023, App. C; diffusers' CMStochasticIterativeScheduler) as
    ``D = c_skip x + c_out F(c_in x, 250 ln sigma)``; its one-step sample is the suite's Euler on ``[sigma_max, 0]``."""

    def __init__(self, unet: nn.Module, sigma_min: float, sigma_data: float, num_classes: int = 0):
        super().__init__()
        self.unet, self.sigma_min, self.sigma_data = unet.eval().requires_grad_(False), sigma_min, sigma_data
        self.num_classes = num_classes

    def forward(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None) -> Tensor:
        sigma = as_sigma_batch(sigma, x).to(torch.float64)
        sd2, shape = self.sigma_data**2, (-1, *([1] * (x.ndim - 1)))
        c_in = (sigma**2 + sd2).rsqrt()
        c_skip = sd2 / ((sigma - self.sigma_min) ** 2 + sd2)
        c_out = (sigma - self.sigma_min) * self.sigma_data * c_in
        c_noise = 250.0 * torch.log(sigma + 1e-44)
        kw = {"class_labels": labels} if self.num_classes and labels is not None else {}
        out = self.unet(x * c_in.reshape(shape).to(x.dtype), c_noise.to(x.dtype), **kw).sample.to(x.dtype)
        return c_skip.reshape(shape).to(x.dtype) * x + c_out.reshape(shape).to(x.dtype) * out


class LatentDecoder(nn.Module):
    """Final state at ``sigma_end`` -> what the pipeline returns: the VP variable ``x / sqrt(1 + sigma_end^2)``,
    decoded by the VAE (``latents / scaling_factor (+ shift_factor)``) for a latent model."""

    def __init__(self, vae: nn.Module | None = None):
        super().__init__()
        self.vae = None if vae is None else vae.eval().requires_grad_(False)

    def forward(self, x: Tensor, sigma_end: float = 0.0) -> Tensor:
        x = x / math.sqrt(1.0 + float(sigma_end) ** 2)
        if self.vae is None:
            return x
        cfg = self.vae.config
        z = x / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
        return self.vae.decode(z.to(next(self.vae.parameters()).dtype)).sample.to(x.dtype)


# ---------------------------------------------------------------------------- specs and folders


@dataclass(frozen=True)
class PipelineSpec:
    """``diffusers:LOCAL_DIR_OR_HUB_ID[@revision][#subfolder][?prompt=TEXT]``, parsed."""

    location: str  # a local folder or a Hub id owner/name
    revision: str | None = None  # Hub ids only
    subfolder: str = ""  # the pipeline inside the folder / repository
    prompt: str | None = None  # text-to-image pipelines


def parse_spec(spec: str) -> PipelineSpec:
    """The text after ``diffusers:`` -> ``PipelineSpec`` (the prompt is the text after ``?prompt=``, verbatim)."""
    head, q, query = spec.partition("?")
    prompt = None
    if q:
        if not query.startswith("prompt="):
            raise ValueError(f"'diffusers:{spec}': the only option is ?prompt=TEXT, got ?{query!r}.")
        prompt = query[len("prompt=") :]
    head, _, sub = head.partition("#")
    rev = None
    if not Path(head).expanduser().is_dir() and "@" in head:
        head, _, rev = head.rpartition("@")
    if not head:
        raise ValueError(f"'diffusers:{spec}' names no folder or Hub id; write e.g. diffusers:DIR or diffusers:owner/name.")
    return PipelineSpec(head, rev or None, sub.strip("/"), prompt)


def _patterns(sub: str) -> list[str]:
    pre = f"{sub}/" if sub else ""
    files = ("*.json", "*.txt", "*.safetensors", "*.bin")
    return [f"{pre}model_index.json", *(f"{pre}{c}/{f}" for c in COMPONENTS for f in files)]


def locate(spec: PipelineSpec) -> Path:
    """The pipeline folder: a local folder, or the Hub snapshot of an id (cache first, then a download)."""
    path = Path(spec.location).expanduser()
    if path.is_dir():
        if spec.revision:
            raise ValueError(f"diffusers:{spec.location}@{spec.revision}: a revision applies to Hub ids, not to folders.")
        return path / spec.subfolder
    return _snapshot(spec, _patterns(spec.subfolder)) / spec.subfolder


def _snapshot(spec: PipelineSpec, patterns: list[str]) -> Path:
    """The Hub snapshot of ``spec.location`` with ``patterns`` (cache first, then a download), or one sentence."""
    from huggingface_hub import snapshot_download

    if not re.fullmatch(r"[\w.-]+/[\w.-]+", spec.location):
        raise ValueError(f"diffusers:{spec.location}: no such folder, and it is not a Hub id of the form owner/name.")
    kw = {"revision": spec.revision, "allow_patterns": patterns,
          "ignore_patterns": ["*.fp16.*", "*non_ema*", "*.ckpt"]}  # fmt: skip
    try:
        root = snapshot_download(spec.location, local_files_only=True, **kw)
    except Exception:
        try:
            root = snapshot_download(spec.location, **kw)
        except Exception:
            rev = f" --revision {spec.revision}" if spec.revision else ""
            raise ValueError(
                f"{spec.location} is not a local folder and could not be downloaded from the Hugging Face Hub "
                f"(offline?): run `huggingface-cli download {spec.location}{rev} --local-dir DIR` on a machine with "
                "network, copy DIR here and pass diffusers:DIR."
            ) from None
    return Path(root)


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise ValueError(f"{path} is missing or not valid JSON; expected a diffusers pipeline folder.") from None


@dataclass(frozen=True)
class PipelineFolder:
    """What a pipeline folder holds (read from its configs, no weights loaded)."""

    path: Path
    unet: dict[str, Any]
    scheduler: dict[str, Any]
    vae: dict[str, Any] | None  # latent models
    text: bool  # text_encoder + tokenizer (UNet2DConditionModel)
    net: str = "unet"  # the folder of the denoising network (``unet`` holds its config): unet | transformer

    @property
    def consistency(self) -> bool:
        return self.scheduler.get("_class_name") == CONSISTENCY

    @property
    def num_classes(self) -> int:
        """1 for a text pipeline (its prompt), the UNet's class embeddings otherwise (0: unconditional)."""
        if self.net == "transformer":
            return int(self.unet.get("num_embeds_ada_norm") or 0)
        return 1 if self.text else int(self.unet.get("num_class_embeds") or 0)

    def kernel_spec(self) -> dict[str, Any]:
        """``{"name", "kwargs"}`` of its kernel: ``edm`` for a consistency model, else ``diffusers``."""
        if self.consistency:
            keys = ("sigma_min", "sigma_max", "rho", "sigma_data")
            defaults = (0.002, 80.0, 7.0, 0.5)
            return {"name": "edm", "kwargs": {k: float(self.scheduler.get(k, d)) for k, d in zip(keys, defaults)}}
        sched = {k: v for k, v in self.scheduler.items() if k == "_class_name" or not k.startswith("_")}
        return {"name": "diffusers", "kwargs": {"scheduler": sched}}

    @property
    def latent(self) -> bool:
        return self.vae is not None

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        size = self.unet["sample_size"]
        h, w = (size, size) if isinstance(size, int) else size
        return int(self.unet["in_channels"]), int(h), int(w)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        if self.vae is None:
            return self.sample_shape
        f = 2 ** (len(self.vae["block_out_channels"]) - 1)
        _, h, w = self.sample_shape
        return int(self.vae.get("out_channels", 3)), h * f, w * f

    def digest(self) -> str:
        """SHA-256 over the relative paths and bytes of every file of the components it reads."""
        h = hashlib.sha256()
        for c in COMPONENTS:
            for f in sorted(p for p in (self.path / c).glob("*") if p.is_file()):
                h.update(f"{c}/{f.name};".encode())
                with open(f, "rb") as fh:
                    while b := fh.read(1 << 20):
                        h.update(b)
        return h.hexdigest()


def read_folder(path: Path, what: str) -> PipelineFolder:
    """Check ``path`` is a pipeline folder (unet/, scheduler/; vae/, text_encoder/, tokenizer/ for a text UNet;
    transformer/, vae/ for DiT)."""
    if (path / "transformer" / "config.json").is_file() and not (path / "unet").is_dir():
        return _read_dit(path, what)
    if not (path / "unet" / "config.json").is_file():
        raise ValueError(f"{what}: {path} holds no unet/config.json; expected a diffusers pipeline folder (unet/, scheduler/).")
    unet = _json(path / "unet" / "config.json")
    scheduler = _json(path / "scheduler" / "scheduler_config.json")
    cls = unet.get("_class_name")
    if cls == "UNet2DModel":
        return PipelineFolder(path, unet, scheduler, None, False)
    if cls != "UNet2DConditionModel":
        raise ValueError(f"{what}: its unet is a {cls}; supported are UNet2DModel and UNet2DConditionModel.")
    missing = [c for c in ("vae", "text_encoder", "tokenizer") if not (path / c).is_dir()]
    if missing:
        raise ValueError(f"{what}: a UNet2DConditionModel pipeline needs vae/, text_encoder/ and tokenizer/; {path} lacks {missing[0]}/.")
    return PipelineFolder(path, unet, scheduler, _json(path / "vae" / "config.json"), True)


def _read_dit(path: Path, what: str) -> PipelineFolder:
    net = _json(path / "transformer" / "config.json")
    if net.get("_class_name") not in _TRANSFORMERS or not net.get("num_embeds_ada_norm"):
        raise ValueError(f"{what}: its transformer is a {net.get('_class_name')}; supported is a class-conditional DiT "
                         f"({' or '.join(_TRANSFORMERS)} with num_embeds_ada_norm).")
    if not (path / "vae").is_dir():
        raise ValueError(f"{what}: a DiT pipeline needs vae/; {path} lacks it.")
    scheduler = _json(path / "scheduler" / "scheduler_config.json")
    return PipelineFolder(path, net, scheduler, _json(path / "vae" / "config.json"), False, "transformer")


def _encode(folder: PipelineFolder, prompt: str, device: torch.device) -> tuple[Tensor, Tensor]:
    """(prompt, empty prompt) CLIP embeddings, tokenized as StableDiffusionPipeline.encode_prompt does."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(folder.path / "tokenizer")
    enc = CLIPTextModel.from_pretrained(folder.path / "text_encoder").to(device).eval()
    use_mask = bool(getattr(enc.config, "use_attention_mask", False))
    out = []
    with torch.inference_mode():
        for text in (prompt, ""):
            t = tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
            mask = t.attention_mask.to(device) if use_mask else None
            out.append(enc(t.input_ids.to(device), attention_mask=mask)[0])
    return out[0], out[1]


def load_denoiser(folder: PipelineFolder, kernel, prompt: str | None, device: torch.device) -> nn.Module:
    """The folder's UNet as a Denoiser (text pipelines: conditioned on ``prompt`` / the empty prompt)."""
    import diffusers

    if folder.net == "transformer":  # one of _TRANSFORMERS (read_folder checked it): never a name a file chooses
        cls = {n: getattr(diffusers, n) for n in _TRANSFORMERS}[folder.unet["_class_name"]]
    else:
        cls = diffusers.UNet2DConditionModel if folder.text else diffusers.UNet2DModel
    unet = cls.from_pretrained(folder.path / folder.net, low_cpu_mem_usage=False).to(device)
    if folder.consistency:
        return ConsistencyDenoiser(unet, kernel.sigma_min, kernel.sigma_data, folder.num_classes)
    context = _encode(folder, prompt or "", device) if folder.text else None
    null = folder.num_classes if folder.net == "transformer" else None
    return UNetDenoiser(unet, kernel, folder.scheduler.get("prediction_type", "epsilon"), context, null)


# ---------------------------------------------------------------------------- a VAE on its own (latent U-ViT / DiT)


@dataclass(frozen=True)
class VAEFolder:
    """An ``AutoencoderKL`` folder (``config.json`` + weights) given as ``?vae=`` to a latent ``uvit:`` / ``dit:``."""

    path: Path
    config: dict[str, Any]

    def image_shape(self, latent_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """The decoded image shape of latents of ``latent_shape`` (C, h, w): ``out_channels x (h f) x (w f)``."""
        f = 2 ** (len(self.config["block_out_channels"]) - 1)
        return int(self.config.get("out_channels", 3)), int(latent_shape[1]) * f, int(latent_shape[2]) * f

    def digest(self) -> str:
        """SHA-256 over the names and bytes of the folder's files."""
        h = hashlib.sha256()
        for f in sorted(p for p in self.path.glob("*") if p.is_file()):
            h.update(f"{f.name};".encode())
            with open(f, "rb") as fh:
                while b := fh.read(1 << 20):
                    h.update(b)
        return h.hexdigest()

    def decoder(self, device: torch.device) -> LatentDecoder:
        from diffusers import AutoencoderKL

        return LatentDecoder(AutoencoderKL.from_pretrained(self.path, low_cpu_mem_usage=False).to(device))


def read_vae(text: str, what: str) -> VAEFolder:
    """``?vae=`` text -> ``VAEFolder``: an AutoencoderKL folder, a pipeline folder holding ``vae/``, or a Hub id
    ``owner/name[@revision][#subfolder]`` of either (e.g. ``stabilityai/sd-vae-ft-ema``, DiT's VAE)."""
    spec = parse_spec(text)
    path = Path(spec.location).expanduser()
    if not path.is_dir():
        path = _snapshot(spec, ["config.json", "*.safetensors", "*.bin", "vae/config.json", "vae/*.safetensors",
                                "vae/*.bin"] if not spec.subfolder else [f"{spec.subfolder}/*"])
    elif spec.revision:
        raise ValueError(f"{what}: vae={text}: a revision applies to Hub ids, not to folders.")
    path = path / spec.subfolder
    if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        path = path / "vae"
    config = _json(path / "config.json") if (path / "config.json").is_file() else {}
    if config.get("_class_name") != "AutoencoderKL":
        raise ValueError(f"{what}: vae={text} is not an AutoencoderKL folder (config.json with _class_name "
                         "AutoencoderKL) nor a pipeline folder holding vae/.")
    return VAEFolder(path, config)


def load_decoder(folder: PipelineFolder, device: torch.device) -> LatentDecoder:
    """The map from final sampler states to images (the VAE decoder for latent pipelines)."""
    if not folder.latent:
        return LatentDecoder()
    from diffusers import AutoencoderKL

    return LatentDecoder(AutoencoderKL.from_pretrained(folder.path / "vae", low_cpu_mem_usage=False).to(device))
