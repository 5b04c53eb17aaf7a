"""The one check every versioned file of the project goes through (traces, workloads, predictor
states): a dict that names its format and version, both the ones this code reads."""

from __future__ import annotations

from typing import Type


def check_format(blob, path: str, fmt: str, version: int, what: str, error: Type[Exception] = ValueError) -> dict:
    """Return ``blob`` if it is a ``{"format": fmt, "version": version, ...}`` dict; otherwise raise
    ``error`` naming ``path``, what was found and what this code reads. ``what``: the kind of file
    in words ("trace", "workload", "predictor state")."""
    found_fmt = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
    if found_fmt != fmt:
        raise error(f"{path}: not a {fmt} v{version} {what} file (format={found_fmt!r}); valid: format {fmt!r}")
    if blob.get("version") != version:
        raise error(f"{path}: {what} version {blob.get('version')!r} is not supported (this code reads version "
                    f"{version} of {fmt!r})")
    return blob
