"""Closed-form denoisers: the empirical optimal denoiser (Zhang et al. 2024, Prop. 1) and the low-rank
mixture of Gaussians with its closed-form score (Eq. 2, Prop. 2)."""

from .mog import LowRankMoG, score_error
from .optimal import EmpiricalOptimalDenoiser

__all__ = ["EmpiricalOptimalDenoiser", "LowRankMoG", "score_error"]
