"""Studies: the experiments of Zhang et al., "The Emergence of Reproducibility and Generalizability in
Diffusion Models" (ICML 2024), each a ``Study`` (``protocol``) with its defaults in ``configs/studies/<name>.yaml``
and one command, ``python -m lightning_repro.studies.<module>``, that writes a CSV, a PNG and a W&B run.

What they share is written once: ``protocol`` (the ``Study``, config loading, checkpoint keys), ``training``
(training jobs and the worker pool), ``steps`` (output folder, descriptor, subsets, trained denoisers, sampling)
and ``outputs`` (CSV / PNG / W&B writers); the scores come from ``evaluation.scoring``.  ``all_studies()`` is the
registry.
"""

from __future__ import annotations

import importlib

from .protocol import Study, config_key, deep_merge, load_study_config
from .training import TrainJob, load_trained, run_training_jobs

__all__ = ["Study", "STUDY_MODULES", "all_studies", "get_study", "config_key", "deep_merge", "load_study_config",
           "TrainJob", "load_trained", "run_training_jobs"]

#: the study modules, in the paper's order (each defines ``STUDY``)
STUDY_MODULES = (
    "sweep",               # Fig. 2: memorization -> generalization phase transition (N x family x width x seed)
    "baselines",           # Fig. 3 / Sec. 2.3: GANs and VAEs do not reproduce each other; diffusion models do
    "memorization",        # Fig. 4: trained models reproduce the optimal denoiser of the empirical distribution
    "mog_generalization",  # Fig. 5: score error against the closed-form score of a low-rank MoG falls with N
    "procedures",          # Fig. 6: models of different training procedures (EDM, DDPM, CT, CD, progressive,
                           #   Multistage, U-ViT, DiT) reproduce each other
    "mog_transition",      # Sec. 3.2.1 Case 1: models move from the empirical optimal to the closed-form MoG denoiser
    "recovery",            # Sec. 3.2.1: a student trained on a teacher's samples reproduces the teacher
    "hyperplane",          # Fig. 7: maps of the noise plane through three seeds
    "conditional",         # Fig. 8 / App. D: per-class RP of conditional models, unconditional vs conditional
    "inverse",             # Fig. 10 / App. F: inpainting with deterministic DPS, RP between models
    "finetune",            # Fig. 11 / App. G: attention-only fine-tuning vs training from scratch
    "sd_versions",         # Fig. 20 / App. E: Stable Diffusion v1-1 ... v1-4 reproduce each other (same prompt, seeds)
)


def all_studies() -> dict[str, Study]:
    """Every study by name (its config's name), in the paper's order."""
    studies = [importlib.import_module(f"{__name__}.{m}").STUDY for m in STUDY_MODULES]
    return {s.name: s for s in studies}


def get_study(name: str) -> Study:
    """A study by its name (``fig4_memorization``) or its module (``memorization``)."""
    for s in all_studies().values():
        if name in (s.name, s.module):
            return s
    valid = ", ".join(s.name for s in all_studies().values())
    raise ValueError(f"unknown study {name!r}; the studies are: {valid}.")
