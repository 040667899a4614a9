"""Published checkpoints read as data and mapped onto the suite's networks (model layer; no evaluation imports).

``edm_pickle`` (NVlabs/edm ``.pkl``: a restricted unpickler, ``torch_utils.persistence`` records as data),
``state_dicts`` (baofff/U-ViT ``.pth``, facebookresearch/DiT ``.pt``), ``diffusers`` (pipeline folders and hub ids;
imported on its own, as it loads diffusers lazily), ``network`` (``PublishedNet``: the suite
network + preconditioning + kernel, its ``Denoiser`` and converted checkpoints).  ``python -m
lightning_repro.published convert IN OUT.ckpt`` writes a converted checkpoint.
"""

from .edm_pickle import EDM_PRECONDS, EDMUnpickler, PersistentRecord, read_edm_pickle
from .network import NETS, PUBLISHED_KEY, PublishedNet, read_converted, save_converted, sha256_of
from .state_dicts import HEADS, NULL_ROWS, read_dit, read_uvit

__all__ = [
    "EDM_PRECONDS", "EDMUnpickler", "PersistentRecord", "read_edm_pickle",
    "NETS", "PUBLISHED_KEY", "PublishedNet", "read_converted", "save_converted", "sha256_of",
    "HEADS", "NULL_ROWS", "read_dit", "read_uvit", "read_published",
]


def read_published(kind: str, path: str, **options) -> PublishedNet:
    """``kind`` (``edm`` | ``uvit`` | ``dit``) and a file -> ``PublishedNet``; a converted ``.ckpt`` reads as itself."""
    from pathlib import Path

    if Path(path).suffix == ".ckpt":
        return read_converted(path)
    readers = {"edm": read_edm_pickle, "uvit": read_uvit, "dit": read_dit}
    if kind not in readers:
        raise ValueError(f"unknown published format {kind!r}; valid ones are: {', '.join(readers)}.")
    return readers[kind](path, **options)
