#!/usr/bin/env python3
"""Build-time checks of the megatron-probe image (the Dockerfile runs them; no GPU needed).

  check_image.py --record FILE   write the base image's torch version to FILE (before any install)
  check_image.py --check FILE    fail unless torch is still that version (pip did not replace the
                                 image's CUDA build), megatron-core is the pinned version, this
                                 package resolves to the copied repository (so the shipped
                                 checkpoint and workloads are found) and Transformer Engine is
                                 installed; apex is reported, not required (nothing here imports it)

Versions are read from package metadata and modules are located without importing them, so the
check runs on a build machine without a GPU. ``--allow-missing-te`` skips the Transformer Engine
requirement (for running this check outside the image).
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import importlib.util
import os
import sys

MEGATRON_CORE = "0.16.1"


def dist_version(*names: str):
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def problems(base_torch: str, require_te: bool = True) -> list:
    out = []
    torch_now = dist_version("torch")
    if torch_now != base_torch:
        out.append(f"torch is {torch_now!r}, the base image had {base_torch!r}: an install replaced it "
                   "(install with --no-deps or under the image's /etc/pip/constraint.txt)")
    mcore = dist_version("megatron-core", "megatron_core")
    if mcore != MEGATRON_CORE:
        out.append(f"megatron-core is {mcore!r}, expected {MEGATRON_CORE!r}")
    spec = importlib.util.find_spec("megatron_probe")
    if spec is None or spec.origin is None:
        out.append("megatron_probe is not importable")
    else:
        repo = os.path.dirname(os.path.dirname(os.path.abspath(spec.origin)))
        config = os.path.join(repo, "checkpoints", "tiny-moe-v1", "config.json")
        if not os.path.exists(config):
            out.append(f"megatron_probe resolves to {spec.origin}, but {config} is missing "
                       "(install editable from the repository copy, with checkpoints/ beside it)")
    if require_te and not has_module("transformer_engine"):
        out.append("Transformer Engine (transformer_engine) is not installed: use an NVIDIA PyTorch base image")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--record", metavar="FILE", help="write the current torch version here")
    g.add_argument("--check", metavar="FILE", help="compare against the torch version recorded here")
    p.add_argument("--allow-missing-te", action="store_true", help="do not require Transformer Engine")
    a = p.parse_args(argv)
    if a.record:
        version = dist_version("torch")
        if version is None:
            print("torch is not installed in this environment", file=sys.stderr)
            return 1
        with open(a.record, "w") as f:
            f.write(version + "\n")
        print(f"base torch {version}")
        return 0
    with open(a.check) as f:
        base = f.read().strip()
    found = problems(base, require_te=not a.allow_missing_te)
    print(f"torch {dist_version('torch')}, megatron-core {dist_version('megatron-core', 'megatron_core')}, "
          f"transformer_engine {'present' if has_module('transformer_engine') else 'absent'}, "
          f"apex {'present' if has_module('apex') else 'absent (not needed)'}")
    for line in found:
        print("ERROR: " + line, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
