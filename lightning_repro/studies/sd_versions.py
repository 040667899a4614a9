"""App. E / Fig. 20 of Zhang et al. (ICML 2024): Stable Diffusion v1-1 ... v1-4, sampled from the same prompt and
the same seeds with deterministic DDIM, reproduce each other.

Every version (a ``diffusers:`` model reference, ``evaluation.published``) samples seeds 0..S-1 from the one prompt
into cached shards (a rerun reuses them); the descriptor's features give the RP matrix between versions (seed by
seed) and, per version, the same-prompt / different-seed baseline: RP between the samples of seed ``k`` and seed
``k + 1`` (cyclically) of that version.  ``--quick`` builds tiny random SD-layout pipelines itself (each version a
small perturbation of the previous one's UNet, as the real versions continue each other's training) and scores
them with the pixel descriptor.

Writes ``DIR/sd_versions.csv`` (one row per version pair and per baseline), ``DIR/sd_versions.png`` (the RP
heatmap) and ``DIR/samples/``.  Hub ids, prompt, seeds and the GPU settings: ``configs/studies/sd_versions.yaml``.
"""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..evaluation import scoring as score
from .outputs import finish, log
from .protocol import Study, positive_int
from .steps import setup_study

__all__ = ["STUDY", "QUICK", "COLUMNS", "tiny_versions", "run", "plot", "main"]

#: ``--quick``: tiny random pipelines built here, a few seeds and steps, the pixel descriptor (numbers mean nothing).
QUICK: dict[str, Any] = {
    "tiny": True,
    "sample": {"seeds": 6, "steps": 4, "batch_size": 6},
    "metrics": {"descriptor": "pixel", "threshold": None},
}

COLUMNS = ["model_a", "model_b", "pairing", "rp", "mean_similarity", "threshold", "descriptor", "seeds"]
SAME, SHIFTED = "same seed", "seed k vs k+1"


def tiny_versions(names: list[str], folder: Path, step: float = 0.05) -> dict[str, str]:
    """Tiny random SD-layout pipelines under ``folder/<name>``: the first random, each next one its predecessor's
    UNet plus ``step`` x (per-tensor std) Gaussian noise; returns name -> folder (existing folders are reused)."""
    from ..published.tiny_pipelines import write_sd_pipeline

    out, pipe = {}, None
    for k, name in enumerate(names):
        path = folder / name
        out[name] = str(path)
        if (path / "model_index.json").is_file():
            continue
        pipe = pipe or write_sd_pipeline(folder / names[0])
        g = torch.Generator().manual_seed(k)
        with torch.no_grad():
            for p in pipe.unet.parameters() if k else ():
                p.add_(step * p.std().nan_to_num(0.0) * torch.randn(p.shape, generator=g))
        pipe.save_pretrained(path)
    return out


def _samples(cfg: dict[str, Any], specs: dict[str, str], st) -> dict[str, Any]:
    """Each version's uint8 samples (N x H x W x C) of the study's seeds, through cached shards under ``DIR``."""
    from ..evaluation import SamplingOptions, resolve_model

    smp = cfg["sample"]
    options = SamplingOptions(
        sampler=smp["sampler"], steps=positive_int(smp["steps"], "sample.steps"), grid=smp["grid"],
        guidance=float(smp["guidance"]), batch_size=positive_int(smp["batch_size"], "sample.batch_size"),
        precision=smp["precision"], device=str(st.device), progress=True,
    )  # fmt: skip
    out = {}
    for name, spec in specs.items():
        ref = resolve_model(f"diffusers:{spec}?prompt={cfg['prompt']}")
        out[name] = ref.samples_at(st.seeds, st.out, options, log=log).images
    return out


def _score(feats: dict[str, torch.Tensor], st) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Rows for every version pair (same seeds) and every version's different-seed baseline; the RP matrix."""
    names = list(feats)
    matrix = np.full((len(names), len(names)), np.nan)
    rows = []
    common = {"threshold": st.threshold, "descriptor": st.descriptor_name, "seeds": len(st.seeds)}
    for (i, a), (j, b) in itertools.combinations(enumerate(names), 2):
        rp = score.rp(feats[a], feats[b], st.threshold)
        matrix[i, j] = matrix[j, i] = rp
        rows.append({"model_a": a, "model_b": b, "pairing": SAME, "rp": rp,
                     "mean_similarity": score.mean_similarity(feats[a], feats[b]), **common})  # fmt: skip
    for a in names:
        shifted = feats[a].roll(-1, 0)
        rows.append({"model_a": a, "model_b": a, "pairing": SHIFTED, "rp": score.rp(feats[a], shifted, st.threshold),
                     "mean_similarity": score.mean_similarity(feats[a], shifted), **common})  # fmt: skip
    return rows, matrix


def run(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Sample every version from the prompt at the same seeds, score the RP matrix and the baseline, write them."""
    from ..evaluation.report import print_matrix

    if not isinstance(cfg["models"], dict) or len(cfg["models"]) < 2:
        raise ValueError("models must map at least two version names to diffusers folders or Hub ids.")
    st = setup_study(cfg)
    if len(st.seeds) < 2:
        raise ValueError("sample.seeds must be at least 2 (the baseline pairs seed k with seed k + 1).")
    t0 = time.time()
    specs = tiny_versions(list(cfg["models"]), st.out / "tiny_pipelines") if cfg["tiny"] else dict(cfg["models"])
    log(f"sd_versions: {len(specs)} versions x {len(st.seeds)} seeds, prompt {cfg['prompt']!r}, "
        f"{cfg['sample']['sampler']} {cfg['sample']['steps']} steps, guidance {cfg['sample']['guidance']}, "
        f"{st.descriptor_name} descriptor threshold {st.threshold} -> {st.out}")
    images = _samples(cfg, specs, st)
    feats = {name: score.featurize(st.descriptor, x).features for name, x in images.items()}
    rows, matrix = _score(feats, st)
    png = plot(matrix, list(specs), st.out / "sd_versions.png", st.threshold, st.descriptor_name)
    print_matrix(list(specs), matrix, None, log=log)
    log("same prompt, different seeds (seed k vs k+1): "
        + ", ".join(f"{r['model_a']}={r['rp']:.3f}" for r in rows if r["pairing"] == SHIFTED))
    summary = {f"rp_{r['model_a']}_{r['model_b']}" + ("_shifted" if r["pairing"] == SHIFTED else ""): r["rp"]
               for r in rows}  # fmt: skip
    csv_path = finish(STUDY.name, cfg, rows, COLUMNS, "sd_versions.csv", {"plot": png}, summary, COLUMNS[:5])
    log(f"sd_versions done in {time.time() - t0:.0f}s | {csv_path} | {png}")
    return rows


def plot(matrix: np.ndarray, names: list[str], path: Path, threshold: float, descriptor: str) -> Path:
    """The annotated RP heatmap between versions (same seeds; the diagonal is left blank)."""
    from ..evaluation.report import heatmap

    heatmap(matrix, names, f"Fig. 20: RP between SD versions ({descriptor}, threshold {threshold:g})", Path(path),
            ".2f", 0.0, 1.0)
    return Path(path)


STUDY = Study(name="sd_versions", module="sd_versions", paper="Fig. 20",
              title="Stable Diffusion v1-1 ... v1-4: RP between versions, same prompt and seeds", run=run,
              columns=COLUMNS, quick=QUICK, replace=("models",), score=_score, plot=plot)


main = STUDY.main  # main(["--config", FILE, "--out", DIR, "--quick"]) -> the CSV rows


if __name__ == "__main__":
    main(sys.argv[1:])
