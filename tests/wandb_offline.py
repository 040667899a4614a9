"""Read an offline W&B run file (``run-<id>.wandb``) without the network, for tests.

The file is a LevelDB-style log (W&B's transaction log): a 7-byte file header (``:W&B``, magic, version),
then 32 KiB blocks of records, each with a 7-byte header (CRC32, length, type: full/first/middle/last)
whose payloads are ``wandb_internal_pb2.Record`` protobufs.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768


def _records(path: Path):
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload = data[pos + 7: pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind == 1:
            yield payload
        elif kind == 2:
            buf = payload
        elif kind == 3:
            buf += payload
        elif kind == 4:
            yield buf + payload
            buf = b""


def read_offline_run(run_dir: str | Path) -> dict:
    """Return ``{"config", "group", "project", "history_keys", "summary"}`` of an offline run directory.

    ``history_keys`` is the set of keys ever logged with ``run.log``; ``summary`` the run's summary values.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    run_dir = Path(run_dir)
    (f,) = list(run_dir.glob("*.wandb"))
    out = {"config": {}, "group": None, "project": None, "history_keys": set(), "summary": {}}
    for payload in _records(f):
        r = pb.Record()
        r.ParseFromString(payload)
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["group"], out["project"] = r.run.run_group, r.run.project
            for it in r.run.config.update:
                out["config"][it.key] = json.loads(it.value_json)
        elif kind == "history":
            for it in r.history.item:
                out["history_keys"].add(it.key or "/".join(it.nested_key))
        elif kind == "summary":
            for it in r.summary.update:
                out["summary"][it.key or "/".join(it.nested_key)] = json.loads(it.value_json)
        elif kind == "config":
            for it in r.config.update:
                out["config"][it.key] = json.loads(it.value_json)
    return out
