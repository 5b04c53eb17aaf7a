"""Weights & Biases export of per-step metrics, offline by default.

:class:`WandbLogger` is the one place the package talks to wandb: ``WandbLogger(project,
run_dir, config, mode="offline", name=None)``, ``.log(metrics, step=...)``, ``.finish()``. With
``project=None`` it does nothing (and never imports wandb), so callers need no ``if``. wandb is
imported only when a project is given; if it is not installed, a clear error says how to get it
(``pip install 'megatron-probe[wandb]'``). Offline runs land in ``run_dir/wandb/offline-run-*``
and can be uploaded later with ``wandb sync``; :func:`read_offline_run` reads one back without
a network or an account (tests, quick checks).
"""

from __future__ import annotations

import glob
import json
import os
import struct
import time
from typing import Dict, Optional

WANDB_MODES = ("offline", "online", "disabled")


class WandbLogger:
    def __init__(self, project: Optional[str], run_dir: str = ".", config: Optional[Dict] = None,
                 mode: str = "offline", name: Optional[str] = None):
        self.project = project
        self.run = None
        if project is None:
            return
        if mode not in WANDB_MODES:
            raise ValueError(f"wandb mode {mode!r}; valid: {WANDB_MODES}")
        try:
            import wandb
        except ImportError as e:
            raise ImportError(f"wandb logging was asked for (project {project!r}) but wandb is not installed: "
                              "pip install 'megatron-probe[wandb]' (or pip install wandb)") from e
        os.makedirs(run_dir, exist_ok=True)
        self.run = wandb.init(project=project, dir=run_dir, config=dict(config or {}), mode=mode, name=name,
                              reinit="create_new")

    @property
    def enabled(self) -> bool:
        return self.run is not None

    @property
    def run_path(self) -> Optional[str]:
        """The run's own directory (``.../wandb/offline-run-*``), or None when disabled."""
        return None if self.run is None else os.path.dirname(self.run.dir)

    def log(self, metrics: Dict, step: Optional[int] = None) -> None:
        if self.run is not None:
            self.run.log(dict(metrics), step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


# ---------------------------------------------------------------------------- reading back
_BLOCK = 32 * 1024  # the .wandb file is a log of records in 32 KiB blocks
_FILE_HEADER = 7  # ":W&B", magic, version
_REC_HEADER = 7  # crc32 (4), length (2), type (1)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _records(path: str):
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a wandb run file")
    pos, parts = _FILE_HEADER, b""
    while pos + _REC_HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _REC_HEADER:  # block trailer padding
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + _REC_HEADER])
        if kind == 0:  # zero padding to the block's end
            pos += left
            continue
        payload = data[pos + _REC_HEADER:pos + _REC_HEADER + n]
        pos += _REC_HEADER + n
        parts = payload if kind in (_FULL, _FIRST) else parts + payload
        if kind in (_FULL, _LAST):
            yield parts


def read_offline_run(run_path: str, wait_s: float = 30.0) -> Dict:
    """``{"history": [{key: value}, ...], "summary": {key: value}, "config": {key: value}}`` of an
    offline run directory (``.../offline-run-*``, or a folder holding exactly one). wandb's
    service may still be writing the file when ``finish()`` returns: this waits up to ``wait_s``
    seconds for the run's closing record."""
    from wandb.proto import wandb_internal_pb2

    files = glob.glob(os.path.join(run_path, "run-*.wandb"))
    if not files:
        files = glob.glob(os.path.join(run_path, "**", "offline-run-*", "run-*.wandb"), recursive=True)
    if len(files) != 1:
        raise FileNotFoundError(f"expected one wandb run file under {run_path}, found {files}")

    def key(item):
        return item.key or "/".join(item.nested_key)

    from google.protobuf.message import DecodeError

    end = time.monotonic() + wait_s
    while True:
        records, torn = [], None
        for raw in _records(files[0]):
            rec = wandb_internal_pb2.Record()
            try:
                rec.ParseFromString(raw)
            except DecodeError as e:  # the record wandb's service is writing right now
                torn = e
                break
            records.append(rec)
        if torn is None and any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        if time.monotonic() > end:
            if torn is not None:
                raise ValueError(f"{files[0]}: a record is still corrupt after {wait_s:g} s ({torn})") from torn
            break
        time.sleep(0.1)
    out: Dict = {"history": [], "summary": {}, "config": {}, "complete": bool(records) and any(
        r.WhichOneof("record_type") == "exit" for r in records)}
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            out["history"].append({key(i): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            out["summary"].update({key(i): json.loads(i.value_json) for i in rec.summary.update})
        elif kind == "run":
            out["config"].update({key(i): json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            out["config"].update({key(i): json.loads(i.value_json) for i in rec.config.update})
    return out
