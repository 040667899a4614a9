"""Sampling at shared seeds and the pair / matrix evaluation of Zhang et al., ICML 2024 (Sec. 2.1, Figs. 2-6).

``references`` (model specs as types), ``shards`` (seed-ranged sample files), ``scoring`` (RP, MAE, GL: the one
place they are computed), ``distributed`` (torchrun), ``report`` (heatmaps, W&B) and ``cli`` (``evaluate.py``).
"""

from . import published  # noqa: F401  (registers the edm:, uvit:, dit: references)
from .cli import DEFAULT_SEEDS, main, run_matrix, run_pair, run_sample
from .distributed import init_distributed
from .published import DiffusersReference
from .references import (
    REFERENCES,
    CheckpointReference,
    MoGReference,
    OptimalReference,
    Reference,
    SamplesReference,
    parse_data_spec,
    register_reference,
    resolve_model,
    resolve_models,
)
from .scoring import FEATURE_CHUNK, FeatureSet, choose_descriptor, featurize, generalization, score_pair
from .shards import (
    FORMAT,
    SampleSet,
    SamplingOptions,
    content_sha256,
    generate_samples,
    load_samples,
    shard_name,
)

__all__ = [
    "main",
    "run_sample",
    "run_pair",
    "run_matrix",
    "DEFAULT_SEEDS",
    "init_distributed",
    "Reference",
    "CheckpointReference",
    "OptimalReference",
    "MoGReference",
    "SamplesReference",
    "DiffusersReference",
    "REFERENCES",
    "register_reference",
    "resolve_model",
    "resolve_models",
    "parse_data_spec",
    "FEATURE_CHUNK",
    "FeatureSet",
    "featurize",
    "score_pair",
    "generalization",
    "choose_descriptor",
    "FORMAT",
    "SampleSet",
    "SamplingOptions",
    "shard_name",
    "content_sha256",
    "generate_samples",
    "load_samples",
]
