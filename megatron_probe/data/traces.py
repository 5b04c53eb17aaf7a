"""Routing traces: one in-memory structure, one versioned file format, loaders for public data.

In memory
---------
:class:`RoutingTrace` holds, for a model with ``L`` MoE layers, ``E`` experts and top-``K``:

* ``steps``: a list of :class:`TraceStep`, one per engine step, each with ``topk_ids``
  ``[L, T, K]`` int64 (``-1`` where a layer has no routing for a token), optional
  ``topk_probs`` ``[L, T, K]``, ``request_id`` / ``position`` / ``phase`` / ``source_rank``
  ``[T]``, and optional MoE-input hidden states per layer (``hidden[l] = (token_index [Ts],
  states [Ts, H])``, subsampled; ``hidden[-1]``, when present, is the pre-attention input of the
  transformer layer holding MoE layer 0);
* ``heat`` ``[L, E]``: how many tokens routed to each expert (from the steps, or given by an
  aggregate file, which has no steps);
* ``source``/``generated`` flags: where the data came from, and whether it was synthesised.

On disk (``megatron_probe.trace`` version 1)
--------------------------------------------
``torch.save`` of a dict: ``{"format": "megatron_probe.trace", "version": 1, "meta": {model,
num_layers, num_experts, topk, source, generated, notes, ...}, "heat": [L, E] int64, "steps":
[{"topk_ids": int16 [L,T,K], "topk_probs": float16 [L,T,K] | None, "request_id": int32 [T],
"position": int32 [T], "phase": int8 [T], "source_rank": int16 [T], "hidden": {layer: (int32
[Ts], bfloat16 [Ts,H])}}]}``. :func:`save_trace` / :func:`load_trace` write and read it and
check every field; :func:`load_any` picks the loader from the file.

Public formats (``../shared/traces``, see its README)
-----------------------------------------------------
* ``*.route.csv`` (BigMoeOnEdge, per token): :func:`load_route_csv`. The prefill rows of the
  last layer are missing in those files (the recording engine skips it); that documented gap
  is kept as ``-1``, any other missing layer is an error.
* ``coactivation_*.json`` (mbolt, per-layer aggregates): :func:`load_coactivation_json`; no
  steps, only ``heat``.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from megatron_probe import fileformat as ff
from megatron_probe.fileformat import InputFileError, check_format, kind_of, no_unknown_keys, tensor_field, torch_load

TRACE_FORMAT = "megatron_probe.trace"
TRACE_VERSION = 1


class TraceFormatError(InputFileError):
    """A trace file that cannot be read as what it claims to be."""


@dataclass
class TraceStep:
    topk_ids: torch.Tensor  # [L, T, K] int64, -1 = no routing recorded
    topk_probs: Optional[torch.Tensor] = None  # [L, T, K] float32
    request_id: Optional[torch.Tensor] = None  # [T]
    position: Optional[torch.Tensor] = None  # [T] token position inside its request
    phase: Optional[torch.Tensor] = None  # [T] 0 prefill, 1 decode
    source_rank: Optional[torch.Tensor] = None  # [T]
    hidden: Optional[Dict[int, Tuple[torch.Tensor, torch.Tensor]]] = None

    @property
    def num_tokens(self) -> int:
        return self.topk_ids.shape[1]

    def expert_counts(self, layer: int, num_experts: int) -> torch.Tensor:
        ids = self.topk_ids[layer]
        ids = ids[ids >= 0]
        return torch.bincount(ids.long(), minlength=num_experts)

    def rank_expert_counts(self, layer: int, num_experts: int, ep: int) -> torch.Tensor:
        """``[ep, E]`` per-source-rank counts at EP ``ep``. Requests are spread over ranks round-robin
        (``request_id % ep``); without request ids, ``source_rank % ep``, else token ``i`` on ``i % ep``."""
        ids = self.topk_ids[layer].long()
        if self.request_id is not None:
            src = self.request_id.long() % ep
        elif self.source_rank is not None:
            src = self.source_rank.long() % ep
        else:
            src = torch.arange(ids.shape[0]) % ep
        out = torch.zeros(ep, num_experts, dtype=torch.long)
        valid = ids >= 0
        rows = src.unsqueeze(1).expand_as(ids)[valid]
        out.index_put_((rows, ids[valid]), torch.ones_like(rows), accumulate=True)
        return out


@dataclass
class RoutingTrace:
    model: str
    num_layers: int
    num_experts: int
    topk: int
    source: str
    generated: bool = False
    steps: List[TraceStep] = field(default_factory=list)
    heat: Optional[torch.Tensor] = None  # [L, E]
    n_tokens: int = 0
    notes: str = ""
    extra: Dict = field(default_factory=dict)

    def __post_init__(self):
        if self.heat is None:
            self.heat = self.compute_heat()
        if not self.n_tokens and self.steps:
            self.n_tokens = sum(s.num_tokens for s in self.steps)

    def compute_heat(self) -> torch.Tensor:
        heat = torch.zeros(self.num_layers, self.num_experts, dtype=torch.long)
        for s in self.steps:
            for l in range(self.num_layers):
                heat[l] += s.expert_counts(l, self.num_experts)
        return heat

    def validate(self) -> None:
        L, E, K = self.num_layers, self.num_experts, self.topk
        if self.heat.shape != (L, E):
            raise TraceFormatError(f"heat has shape {tuple(self.heat.shape)}, expected ({L}, {E})")
        for i, s in enumerate(self.steps):
            if s.topk_ids.dim() != 3 or s.topk_ids.shape[0] != L or s.topk_ids.shape[2] != K:
                raise TraceFormatError(
                    f"step {i}: topk_ids has shape {tuple(s.topk_ids.shape)}, expected ({L}, T, {K})")
            bad = (s.topk_ids < -1) | (s.topk_ids >= E)
            if bad.any():
                raise TraceFormatError(f"step {i}: expert id {int(s.topk_ids[bad][0])} outside 0..{E - 1}")
            for name in ("request_id", "position", "phase", "source_rank"):
                v = getattr(s, name)
                if v is not None and v.shape != (s.num_tokens,):
                    raise TraceFormatError(f"step {i}: {name} has shape {tuple(v.shape)}, expected ({s.num_tokens},)")
            if s.topk_probs is not None and s.topk_probs.shape != s.topk_ids.shape:
                raise TraceFormatError(f"step {i}: topk_probs shape {tuple(s.topk_probs.shape)} != topk_ids shape")


# ---------------------------------------------------------------------------- own format
def save_trace(trace: RoutingTrace, path: str) -> None:
    trace.validate()
    meta = dict(model=trace.model, num_layers=trace.num_layers, num_experts=trace.num_experts, topk=trace.topk,
                source=trace.source, generated=trace.generated, notes=trace.notes, n_tokens=trace.n_tokens,
                extra=trace.extra)

    def opt(t, dtype):
        return None if t is None else t.to(dtype)

    steps = [{
        "topk_ids": s.topk_ids.to(torch.int16), "topk_probs": opt(s.topk_probs, torch.float16),
        "request_id": opt(s.request_id, torch.int32), "position": opt(s.position, torch.int32),
        "phase": opt(s.phase, torch.int8), "source_rank": opt(s.source_rank, torch.int16),
        "hidden": None if s.hidden is None else {int(l): (i.to(torch.int32), h.to(torch.bfloat16))
                                                 for l, (i, h) in s.hidden.items()},
    } for s in trace.steps]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({"format": TRACE_FORMAT, "version": TRACE_VERSION, "meta": meta, "heat": trace.heat, "steps": steps},
               path)


STEP_KEYS = ("topk_ids", "topk_probs", "request_id", "position", "phase", "source_rank", "hidden")
META_KEYS = ("model", "num_layers", "num_experts", "topk", "source", "generated", "notes", "n_tokens", "extra")


def load_trace(path: str) -> RoutingTrace:
    """Read a ``megatron_probe.trace`` v1 file, checking every field (type, dtype, shape, range);
    raises :class:`TraceFormatError` naming the file, the field and what was expected."""
    what = "a megatron_probe trace file (torch.save of a 'megatron_probe.trace' dict)"
    blob = torch_load(path, what, TraceFormatError)
    check_format(blob, path, TRACE_FORMAT, TRACE_VERSION, "trace", TraceFormatError)
    no_unknown_keys(blob, ("format", "version", "meta", "heat", "steps"), path, "the top level", TraceFormatError)

    def f(d, key, kind, where, **kw):
        return ff.field(d, key, path, kind, where, error=TraceFormatError, **kw)

    meta = f(blob, "meta", "dict", "")
    no_unknown_keys(meta, META_KEYS, path, "meta", TraceFormatError)
    L = f(meta, "num_layers", "int", "meta.", lo=1)
    E = f(meta, "num_experts", "int", "meta.", lo=1)
    K = f(meta, "topk", "int", "meta.", lo=1, hi=E)
    model, source = f(meta, "model", "str", "meta."), f(meta, "source", "str", "meta.")
    heat = tensor_field(blob, "heat", path, "", "int", shape=(L, E), error=TraceFormatError)
    if (heat < 0).any():
        raise TraceFormatError(f"{path}: field 'heat' has a negative count {int(heat.min())}; expected counts >= 0")
    raw = f(blob, "steps", "list", "")
    if not raw:
        raise TraceFormatError(f"{path}: field 'steps' is empty; expected at least one recorded step")
    steps = []
    for i, s in enumerate(raw):
        w = f"steps[{i}]."
        if not isinstance(s, dict):
            raise TraceFormatError(f"{path}: {w[:-1]} is {kind_of(s)}, expected an object with fields {list(STEP_KEYS)}")
        no_unknown_keys(s, STEP_KEYS, path, w[:-1], TraceFormatError)
        ids = tensor_field(s, "topk_ids", path, w, "int", shape=(L, None, K), error=TraceFormatError)
        T = ids.shape[1]
        bad = (ids < -1) | (ids >= E)
        if bad.any():
            raise TraceFormatError(f"{path}: field '{w}topk_ids' has expert id {int(ids[bad][0])}; expected "
                                   f"0..{E - 1} (or -1: no routing)")
        probs = tensor_field(s, "topk_probs", path, w, "float", shape=(L, T, K), optional=True, error=TraceFormatError)
        per_token = {k: tensor_field(s, k, path, w, "int", shape=(T,), optional=True, error=TraceFormatError)
                     for k in ("request_id", "position", "phase", "source_rank")}
        hidden = None
        if s.get("hidden") is not None:
            hid = s["hidden"]
            if not isinstance(hid, dict):
                raise TraceFormatError(f"{path}: field '{w}hidden' is {kind_of(hid)}, expected a dict "
                                       "{layer: (token_index, states)} or null")
            hidden = {}
            for l, pair in hid.items():
                hw = f"{w}hidden[{l!r}]"
                if not (type(l) is int and -1 <= l < L):
                    raise TraceFormatError(f"{path}: field '{w}hidden' has layer key {l!r}; expected an integer "
                                           f"in -1..{L - 1}")
                if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                    raise TraceFormatError(f"{path}: field '{hw}' is {kind_of(pair)}, expected a pair "
                                           "(token_index [Ts], states [Ts, H])")
                idx = tensor_field({"token_index": pair[0]}, "token_index", path, hw + ".", "int", dim=1,
                                   error=TraceFormatError)
                st = tensor_field({"states": pair[1]}, "states", path, hw + ".", "float", shape=(idx.shape[0], None),
                                  error=TraceFormatError)
                if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= T):
                    raise TraceFormatError(f"{path}: field '{hw}.token_index' has token {int(idx.max())}; expected "
                                           f"0..{T - 1} (the step has {T} tokens)")
                hidden[l] = (idx.long(), st)

        def i64(t):
            return None if t is None else t.long()

        steps.append(TraceStep(topk_ids=ids.long(), topk_probs=None if probs is None else probs.float(),
                               request_id=i64(per_token["request_id"]), position=i64(per_token["position"]),
                               phase=i64(per_token["phase"]), source_rank=i64(per_token["source_rank"]),
                               hidden=hidden))
    tr = RoutingTrace(model=model, num_layers=L, num_experts=E, topk=K, source=source,
                      generated=f(meta, "generated", "bool", "meta.", default=False), steps=steps, heat=heat.long(),
                      n_tokens=f(meta, "n_tokens", "int", "meta.", lo=0, default=0),
                      notes=f(meta, "notes", "str", "meta.", default=""), extra=f(meta, "extra", "dict", "meta.",
                                                                                   default={}))
    try:
        tr.validate()
    except TraceFormatError as e:
        raise TraceFormatError(f"{path}: {e}") from None
    return tr


# ---------------------------------------------------------------------------- public formats
ROUTE_CSV_HEADER = ["turn", "phase", "step", "layer", "slot", "expert", "weight", "residency", "expert_bytes"]
ROUTE_CSV_WHAT = "a BigMoeOnEdge route_trace v1 CSV (see ../shared/traces/README.md)"


def load_route_csv(path: str, strict_layers: bool = True) -> RoutingTrace:
    """BigMoeOnEdge ``route_trace v1`` per-token CSV -> RoutingTrace.

    The prefill batch is one step, each decode token one step (the recording engine ran one
    request). Raises :class:`TraceFormatError`, naming the file and line, on a missing, empty,
    binary or cut-off file (the last line must end with a newline), an unknown header or
    preamble, a field that is not a number, a row whose layer, slot or expert is out of range, a
    row given twice, a token with a wrong number of slots or with rows of both phases, or a token
    missing layers (other than the documented missing last layer of prefill rows)."""
    text = ff.read_text(path, ROUTE_CSV_WHAT, TraceFormatError)
    lines = text.splitlines()
    if not text.endswith("\n"):
        raise TraceFormatError(f"{path}: line {len(lines)} is cut off (the file does not end with a newline: "
                               f"truncated?); expected {ROUTE_CSV_WHAT}")
    pre = [l for l in lines if l.startswith("#")]
    body = [(n, l) for n, l in enumerate(lines, start=1) if not l.startswith("#") and l.strip()]
    if not pre or not pre[0].startswith("# route_trace v1"):
        raise TraceFormatError(f"{path}: first line must be '# route_trace v1', got {pre[0] if pre else '(none)'!r}")
    meta = {}
    for tok in pre[1].lstrip("# ").split() if len(pre) > 1 else []:
        if "=" in tok:
            k, v = tok.split("=", 1)
            meta[k] = v
    for key in ("n_layer", "n_expert", "n_expert_used"):
        if key not in meta:
            raise TraceFormatError(f"{path}: preamble has no {key}= (got {sorted(meta)}); expected the line "
                                   "'# model=... n_layer=L n_expert=E n_expert_used=K'")
    sizes = {}
    for key in ("n_layer", "n_expert", "n_expert_used"):
        try:
            sizes[key] = int(meta[key])
        except ValueError:
            sizes[key] = None
        if sizes[key] is None or sizes[key] < 1:
            raise TraceFormatError(f"{path}: preamble field {key}={meta[key]!r}, expected an integer >= 1")
    L, E, K = sizes["n_layer"], sizes["n_expert"], sizes["n_expert_used"]
    if K > E:
        raise TraceFormatError(f"{path}: preamble field n_expert_used={K} exceeds n_expert={E}")
    if not body:
        raise TraceFormatError(f"{path}: no CSV rows (only the preamble); expected the header {ROUTE_CSV_HEADER} "
                               "and one row per routed expert")
    header = next(csv.reader([body[0][1]]))
    if header != ROUTE_CSV_HEADER:
        raise TraceFormatError(f"{path}: line {body[0][0]}: unknown header {header}; expected {ROUTE_CSV_HEADER}")
    if len(body) == 1:
        raise TraceFormatError(f"{path}: no data rows after the header; expected one row per routed expert")
    tokens: Dict[Tuple[int, int], Dict] = {}
    for n, line in body[1:]:
        row = next(csv.reader([line]))
        if len(row) != len(ROUTE_CSV_HEADER):
            raise TraceFormatError(f"{path}: line {n} has {len(row)} fields, expected {len(ROUTE_CSV_HEADER)} "
                                   f"({','.join(ROUTE_CSV_HEADER)})")
        vals = []
        for name, x in zip(ROUTE_CSV_HEADER[:6], row[:6]):
            try:
                vals.append(int(x))
            except ValueError:
                raise TraceFormatError(f"{path}: line {n}: field {name!r} is {x!r}, expected an integer") from None
        turn, phase, step, layer, slot, expert = vals
        try:
            weight = float(row[6])
        except ValueError:
            weight = float("nan")
        if weight != weight or weight in (float("inf"), float("-inf")):
            raise TraceFormatError(f"{path}: line {n}: field 'weight' is {row[6]!r}, expected a finite number")
        if phase not in (0, 1):
            raise TraceFormatError(f"{path}: line {n}: field 'phase' is {phase}, expected 0 (prefill) or 1 (decode)")
        if not 0 <= layer < L:
            raise TraceFormatError(f"{path}: line {n}: layer {layer} outside 0..{L - 1}")
        if not 0 <= slot < K:
            raise TraceFormatError(f"{path}: line {n}: slot {slot} outside 0..{K - 1} (top-k is {K})")
        if not 0 <= expert < E:
            raise TraceFormatError(f"{path}: line {n}: expert {expert} outside 0..{E - 1}")
        t = tokens.setdefault((turn, step), {"phase": phase, "ids": {}, "w": {}})
        if t["phase"] != phase:
            raise TraceFormatError(f"{path}: line {n}: token turn={turn} step={step} has phase {phase} here and "
                                   f"{t['phase']} in an earlier row; expected one phase per token")
        ids = t["ids"].setdefault(layer, [-1] * K)
        if ids[slot] != -1:
            raise TraceFormatError(f"{path}: line {n}: token turn={turn} step={step} layer {layer} slot {slot} "
                                   "appears twice; expected one row per (token, layer, slot)")
        ids[slot] = expert
        t["w"].setdefault(layer, [0.0] * K)[slot] = weight
    keys = sorted(tokens)
    for key in keys:
        t = tokens[key]
        missing = [l for l in range(L) if l not in t["ids"]]
        allowed = [L - 1] if t["phase"] == 0 else []
        if strict_layers and [m for m in missing if m not in allowed]:
            raise TraceFormatError(f"{path}: token turn={key[0]} step={key[1]} has no rows for layers "
                                   f"{[m for m in missing if m not in allowed][:10]} (trace has {L} layers)")
        for l, ids in t["ids"].items():
            if -1 in ids:
                raise TraceFormatError(f"{path}: token step={key[1]} layer {l} has {K - ids.count(-1)} of {K} slots")

    def tensorise(group):
        ids = torch.full((L, len(group), K), -1, dtype=torch.long)
        w = torch.zeros(L, len(group), K)
        for j, key in enumerate(group):
            for l, row in tokens[key]["ids"].items():
                ids[l, j] = torch.tensor(row)
                w[l, j] = torch.tensor(tokens[key]["w"][l])
        return ids, w

    steps = []
    prefill = [k for k in keys if tokens[k]["phase"] == 0]
    decode = [k for k in keys if tokens[k]["phase"] != 0]
    groups = ([prefill] if prefill else []) + [[k] for k in decode]
    for g in groups:
        ids, w = tensorise(g)
        steps.append(TraceStep(topk_ids=ids, topk_probs=w, request_id=torch.tensor([k[0] for k in g]),
                               position=torch.tensor([k[1] for k in g]),
                               phase=torch.tensor([tokens[k]["phase"] for k in g])))
    model = os.path.basename(meta.get("model", path)).split(".gguf")[0]
    return RoutingTrace(model=model, num_layers=L, num_experts=E, topk=K, source=f"route_csv:{path}", steps=steps,
                        notes="one request; prefill rows lack the last layer (recording engine)")


COACTIVATION_FIELDS = ("n_layers", "n_expert_per_layer", "k", "n_decode_tokens", "layers")
COACTIVATION_WHAT = ("an mbolt coactivation JSON (an object with n_layers, n_expert_per_layer, k, n_decode_tokens "
                     "and layers: a list of {heat: [E integers], ...}; see ../shared/traces/README.md)")


def load_coactivation_json(path: str) -> RoutingTrace:
    """mbolt coactivation aggregate -> RoutingTrace with ``heat`` only (no steps). Raises
    :class:`TraceFormatError` naming the file and field on anything else: another top-level
    layout, a missing or renamed field, layers missing or out of order, heat that is not a list
    of ``E`` integers >= 0, or more heat than tokens x k."""
    data = ff.load_json(path, COACTIVATION_WHAT, dict, TraceFormatError)
    fmt = data.get("format")
    if isinstance(fmt, str) and fmt in ff.KNOWN_FORMATS:
        raise TraceFormatError(f"{path}: is {ff.KNOWN_FORMATS[fmt]} file (format={fmt!r}), not {COACTIVATION_WHAT}")
    for key in COACTIVATION_FIELDS:
        if key not in data:
            raise TraceFormatError(f"{path}: no {key!r} field (has {sorted(data)[:12]}); expected {COACTIVATION_WHAT}")

    def f(key, kind, where="", d=data, **kw):
        return ff.field(d, key, path, kind, where, error=TraceFormatError, **kw)

    L, E = f("n_layers", "int", lo=1), f("n_expert_per_layer", "int", lo=1)
    K, n = f("k", "int", lo=1, hi=E), f("n_decode_tokens", "int", lo=1)
    layers = f("layers", "list")
    if len(layers) != L:
        raise TraceFormatError(f"{path}: {len(layers)} layers listed, n_layers says {L} (missing layers)")
    heat = torch.zeros(L, E, dtype=torch.long)
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict):
            raise TraceFormatError(f"{path}: field 'layers[{i}]' is {kind_of(layer)}, expected an object with a "
                                   "'heat' list")
        if "layer" in layer and layer["layer"] != i:
            raise TraceFormatError(f"{path}: field 'layers[{i}].layer' is {layer['layer']!r}, expected {i} (layers "
                                   "out of order or missing)")
        h = layer.get("heat")
        if not isinstance(h, list) or len(h) != E:
            raise TraceFormatError(f"{path}: layer {i} heat has {len(h) if isinstance(h, list) else None} entries, "
                                   f"expected {E}" + ("" if isinstance(h, list) else
                                                      f" (field 'layers[{i}].heat' is {ff.show(h)})"))
        ff.int_list(h, path, f"layers[{i}].heat", E, lo=0, error=TraceFormatError)
        heat[i] = torch.tensor(h, dtype=torch.long)
    over = heat.sum(1) > n * K
    if over.any():
        l = int(over.nonzero()[0])
        raise TraceFormatError(f"{path}: layer {l} heat sums to {int(heat[l].sum())}, more than n_decode_tokens x k "
                               f"= {n * K}")
    return RoutingTrace(model=str(data.get("model", os.path.basename(path))), num_layers=L, num_experts=E, topk=K,
                        source=f"coactivation_json:{path}", heat=heat, n_tokens=n,
                        notes="aggregate over decode tokens: no per-token rows, no request boundaries")


def load_any(path: str) -> RoutingTrace:
    """Pick the loader by file name: ``*.csv`` a BigMoeOnEdge route CSV, ``*.json`` an mbolt
    coactivation aggregate, anything else this project's ``.pt`` trace."""
    if path.endswith(".route.csv") or path.endswith(".csv"):
        return load_route_csv(path)
    if path.endswith(".json"):
        return load_coactivation_json(path)
    return load_trace(path)


def shared_trace_files(shared_dir: Optional[str] = None) -> List[str]:
    """Every public trace file in ``../shared/traces`` (relative to the repository root)."""
    root = shared_dir or os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                      "..", "shared", "traces")
    out = []
    for dirpath, _, files in os.walk(root):
        for fn in sorted(files):
            if fn.endswith(".route.csv") or (fn.startswith("coactivation_") and fn.endswith(".json")):
                out.append(os.path.normpath(os.path.join(dirpath, fn)))
    return sorted(out)
