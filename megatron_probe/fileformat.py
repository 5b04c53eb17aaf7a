"""Reading the project's input files safely: the one format/version check every versioned file goes
through (traces, workloads, predictor states), and the helpers every loader uses to open a file
and check its fields.

Every loader raises :class:`InputFileError` (a ``ValueError``) whose message names the file, the
field (or key, layer, line) and what was expected; the tools turn it into exit code 2
(``argparse``'s ``p.error``) before they write anything. Files are read as plain JSON or with
``torch.load(..., weights_only=True)``, never by unpickling arbitrary objects.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional, Sequence, Type


class InputFileError(ValueError):
    """A file that cannot be read as what the caller expects; the message names the file, the
    field and what was expected."""


# what each of the project's formats is, for messages about a file of one kind given for another
KNOWN_FORMATS = {"megatron_probe.trace": "a routing trace", "megatron_probe.workload": "a serving workload",
                 "megatron_probe.predictor": "a predictor state",
                 "megatron_probe.tiny_moe.v1": "a checkpoint's config.json"}


def check_format(blob, path: str, fmt: str, version: int, what: str, error: Type[Exception] = ValueError) -> dict:
    """Return ``blob`` if it is a ``{"format": fmt, "version": version, ...}`` dict; otherwise raise
    ``error`` naming ``path``, what was found and what this code reads. ``what``: the kind of file
    in words ("trace", "workload", "predictor state")."""
    if not isinstance(blob, dict):
        raise error(f"{path}: not a {fmt} v{version} {what} file: it holds {kind_of(blob)} where a dict with "
                    f"format={fmt!r} was expected; valid: format {fmt!r}")
    found_fmt = blob.get("format")
    if found_fmt != fmt:
        known = KNOWN_FORMATS.get(found_fmt) if isinstance(found_fmt, str) else None
        raise error(f"{path}: not a {fmt} v{version} {what} file (format={found_fmt!r}"
                    + (f": {known} file" if known else "") + f"); valid: format {fmt!r}")
    if blob.get("version") != version or isinstance(blob.get("version"), bool):
        raise error(f"{path}: {what} version {blob.get('version')!r} is not supported (this code reads version "
                    f"{version} of {fmt!r})")
    return blob


def kind_of(v: Any) -> str:
    """``v``'s type in words, JSON names where they apply ("a JSON list", "a Tensor")."""
    names = {dict: "an object", list: "a list", tuple: "a tuple", str: "a string", bool: "a boolean",
             int: "an integer", float: "a float", type(None): "null"}
    for t, name in names.items():
        if type(v) is t:
            return name
    return f"a {type(v).__name__}"


def show(v: Any, width: int = 60) -> str:
    """``v``'s repr, shortened, and its type: what a message says was found."""
    r = repr(v)
    if len(r) > width:
        r = r[: width - 3] + "..."
    return f"{r} ({kind_of(v)})"


# ---------------------------------------------------------------------------- opening files
def check_file(path: str, what: str, error: Type[Exception] = InputFileError) -> None:
    """Refuse a path that is missing, a folder, or an empty file."""
    if not isinstance(path, (str, os.PathLike)):
        raise error(f"{path!r}: not a file path; expected {what}")
    if not os.path.exists(path):
        raise error(f"{path}: no such file; expected {what}")
    if os.path.isdir(path):
        raise error(f"{path}: is a folder, not a file; expected {what}")
    if os.path.getsize(path) == 0:
        raise error(f"{path}: empty file (0 bytes); expected {what}")


def read_text(path: str, what: str, error: Type[Exception] = InputFileError) -> str:
    """The file's text (UTF-8)."""
    check_file(path, what, error)
    with open(path, "rb") as f:
        if f.read(4) == b"PK\x03\x04":
            raise error(f"{path}: is a torch.save (zip) archive, not a text file; expected {what}")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise error(f"{path}: not a text file (byte {e.start} is not UTF-8); expected {what}") from None
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror}); expected {what}") from None


def parse_json(text: str, path: str, what: str, error: Type[Exception] = InputFileError, line: str = "") -> Any:
    """``json.loads(text)``; a decode error names the place (``line``: a prefix such as "line 7: ")."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        cut = e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string")
        cut = "; the text ends there: the file is cut off (truncated?)" if cut else ""
        where = f"column {e.colno}" if line else f"line {e.lineno} column {e.colno}"
        raise error(f"{path}: {line}not JSON at {where} ({e.msg}){cut}; expected {what}") from None


def load_json(path: str, what: str, top: Optional[type] = dict, error: Type[Exception] = InputFileError) -> Any:
    """A JSON file's content; ``top``: the type the top level must have (``dict``: an object)."""
    data = parse_json(read_text(path, what, error), path, what, error)
    if top is not None and not isinstance(data, top):
        raise error(f"{path}: the top level is {kind_of(data)}, expected {kind_of(top())} ({what})")
    return data


def torch_load(path: str, what: str, error: Type[Exception] = InputFileError) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU; a file that is not a torch file, or one
    that is cut off or corrupt, raises ``error`` saying so."""
    import torch

    check_file(path, what, error)
    with open(path, "rb") as f:
        head = f.read(64)
    if head.lstrip()[:1] in (b"{", b"["):
        raise error(f"{path}: not {what}: it holds JSON text, not a torch.save file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, OSError, UnpicklingError, ... for bad files
        raise error(f"{path}: not {what}: {_torch_reason(e, head.startswith(b'PK'))}") from None


def _torch_reason(e: Exception, zip_archive: bool) -> str:
    msg = str(e)
    for line in msg.splitlines():
        if "Unsupported global" in line or "Can only build" in line:
            return "it holds objects a weights-only load refuses: " + line.strip().split("error: ")[-1][:160]
    if zip_archive or "central directory" in msg or "zip archive" in msg or isinstance(e, EOFError):
        return "the torch.save archive is cut off or corrupt (truncated file?)"
    if "Weights only load failed" in msg or "pickle" in type(e).__name__.lower():
        return "not a torch.save file (random or corrupt bytes)"
    first = msg.splitlines()[0][:160] if msg else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


# ---------------------------------------------------------------------------- fields
_MISSING = object()


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


KINDS = {
    "int": (_is_int, "an integer"),
    "number": (_is_number, "a finite number"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "list": (lambda v: isinstance(v, list), "a list"),
    "dict": (lambda v: isinstance(v, dict), "an object (dict)"),
    "int_or_none": (lambda v: v is None or _is_int(v), "an integer or null"),
}


def field(d: dict, key: str, path: str, kind: str, where: str = "", lo=None, hi=None, default=_MISSING,
          error: Type[Exception] = InputFileError):
    """``d[key]``, checked: ``kind`` one of :data:`KINDS`, within ``lo``..``hi`` for numbers (and
    for the length of lists). ``where``: the field's path in the file, as a prefix
    (``"meta."``, ``"requests[3]."``). A missing key returns ``default`` when one is given."""
    name = f"{where}{key}"
    ok, desc = KINDS[kind]
    if not isinstance(d, dict):
        raise error(f"{path}: {where.rstrip('.') or 'the top level'} is {kind_of(d)}, expected an object with a "
                    f"{key!r} field")
    if key not in d:
        if default is not _MISSING:
            return default
        have = sorted(str(k) for k in d)
        raise error(f"{path}: no field {name!r}; expected {desc} there (fields present: {have[:14]}"
                    f"{' ...' if len(have) > 14 else ''})")
    v = d[key]
    if not ok(v):
        raise error(f"{path}: field {name!r} is {show(v)}, expected {desc}")
    if kind == "list":
        if lo is not None and len(v) < lo:
            raise error(f"{path}: field {name!r} has {len(v)} entries, expected at least {lo}"
                        + (" (it is empty)" if not v else ""))
    elif v is not None and kind in ("int", "number", "int_or_none"):
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            rng = (f"in {lo}..{hi}" if lo is not None and hi is not None else f">= {lo}" if lo is not None
                   else f"<= {hi}")
            raise error(f"{path}: field {name!r} is {v}, expected {desc} {rng}")
    return v


def int_list(v, path: str, name: str, length: Optional[int] = None, lo=None, error: Type[Exception] = InputFileError):
    """Check that ``v`` is a list of integers (not floats, not booleans) of ``length``, each >= ``lo``."""
    if not isinstance(v, list):
        raise error(f"{path}: field {name!r} is {show(v)}, expected a list of integers")
    if length is not None and len(v) != length:
        raise error(f"{path}: field {name!r} has {len(v)} entries, expected {length}")
    for i, x in enumerate(v):
        if not _is_int(x) or (lo is not None and x < lo):
            raise error(f"{path}: field {name}[{i}] is {show(x)}, expected an integer"
                        + (f" >= {lo}" if lo is not None else ""))
    return v


def no_unknown_keys(d: dict, known: Sequence[str], path: str, where: str, error: Type[Exception] = InputFileError):
    """Refuse keys outside ``known`` (a renamed field shows up here, not as a silently missing one)."""
    extra = sorted(str(k) for k in d if k not in known)
    if extra:
        raise error(f"{path}: {where or 'the top level'} has unknown fields {extra}; valid: {list(known)}")


def tensor_field(d: dict, key: str, path: str, where: str = "", dtype: str = "int", dim: Optional[int] = None,
                 shape: Optional[Sequence[Optional[int]]] = None, optional: bool = False,
                 error: Type[Exception] = InputFileError):
    """``d[key]`` as a tensor of ``dtype`` ("int": an integer dtype; "float": a floating dtype), of
    ``dim`` dimensions and ``shape`` (``None`` entries: any size). ``optional``: absent or None
    returns None."""
    import torch

    name = f"{where}{key}"
    if key not in d or d[key] is None:
        if optional:
            return None
        raise error(f"{path}: no field {name!r}; expected a tensor" if key not in d else
                    f"{path}: field {name!r} is null, expected a tensor")
    t = d[key]
    if not isinstance(t, torch.Tensor):
        raise error(f"{path}: field {name!r} is {show(t)}, expected a tensor")
    if dtype == "int" and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise error(f"{path}: field {name!r} has dtype {t.dtype}, expected an integer dtype")
    if dtype == "float" and not t.is_floating_point():
        raise error(f"{path}: field {name!r} has dtype {t.dtype}, expected a floating-point dtype")
    if dim is None and shape is not None:
        dim = len(shape)
    if dim is not None and t.dim() != dim:
        raise error(f"{path}: field {name!r} has shape {tuple(t.shape)}, expected {dim} dimensions"
                    + (f" {_shape_text(shape)}" if shape is not None else ""))
    if shape is not None and any(s is not None and s != n for s, n in zip(shape, t.shape)):
        raise error(f"{path}: field {name!r} has shape {tuple(t.shape)}, expected {_shape_text(shape)}")
    return t


def _shape_text(shape) -> str:
    return "(" + ", ".join("*" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
