"""Bad input files for every loader and every tool.

Each kind of file the project reads (this project's ``.pt`` traces, the public traces of
``../shared/traces`` in their layouts, workloads, checkpoints, predictor states, hardware
profiles, JSON results read back, JSON lines) is broken in the ways files break: missing, empty,
cut off, random bytes, a valid container of the wrong kind, a missing or renamed field, a wrong
dtype, empty contents, wrong shapes, another model's file. The loaders must raise a ValueError
naming the file, the field and what was expected (tested in-process, many variants); every tool
must exit with code 2 and that message, print no traceback and write nothing (tested on at least
one bad file of each kind it reads: by subprocess once per tool, the other kinds through the
tool's ``main(argv)`` in-process).
"""

import dataclasses
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

from megatron_probe.data.traces import (RoutingTrace, TraceFormatError, TraceStep, load_any, load_coactivation_json,
                                        load_route_csv, load_trace, save_trace)
from megatron_probe.data.workloads import Request, Workload, check_workload_fits
from megatron_probe.experiments.tiny_moe import (TinyMoEConfig, check_predictor_state, check_trace_for_checkpoint,
                                                 expected_state_shapes, read_checkpoint)
from megatron_probe.fileformat import InputFileError
from megatron_probe.mechanism.event_log import read_jsonl
from megatron_probe.policy.cost_model import PRESETS, get_profile
from megatron_probe.policy.predictor import PredictorSet, RouterSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")
SHARED = os.path.normpath(os.path.join(ROOT, "..", "shared", "traces"))
SHIPPED = os.path.join(ROOT, "checkpoints", "tiny-moe-v1")
SHIFT = os.path.join(ROOT, "workloads", "shift.json")
HAVE_SHIPPED = os.path.exists(os.path.join(SHIPPED, "model.pt"))
QWEN_CSV = os.path.join(SHARED, "bigmoeonedge", "qwen3-30b-a3b.route.csv")
QWEN_AGG = os.path.join(SHARED, "mbolt", "coactivation_qwen3-30b-a3b.json")
needs_shared = pytest.mark.skipif(not (os.path.exists(QWEN_CSV) and os.path.exists(QWEN_AGG)),
                                  reason="../shared/traces not present")
needs_shipped = pytest.mark.skipif(not HAVE_SHIPPED, reason="no shipped checkpoint")


def refused(fn, path, *words, error=ValueError):
    """``fn()`` raises ``error`` whose message names ``path`` and holds every one of ``words``."""
    with pytest.raises(error) as e:
        fn()
    msg = str(e.value)
    assert str(path) in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


def random_bytes(n=4096, seed=0):
    return random.Random(seed).randbytes(n)


def byte_variant(good, tmp_path, kind):
    """A broken copy of the file ``good``: ``missing``, ``empty``, ``truncated`` (first half of
    its bytes), ``random`` (random bytes), ``folder`` (a folder in its place)."""
    path = tmp_path / f"{kind}{''.join(good.suffixes) if hasattr(good, 'suffixes') else ''}"
    data = open(good, "rb").read()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "random":
        path.write_bytes(random_bytes())
    elif kind == "folder":
        path.mkdir()
    return path


BYTE_WORDS = {"missing": "no such file", "empty": "empty file (0 bytes)", "folder": "is a folder"}


# ---------------------------------------------------------------------------- this project's .pt traces
L, E, K = 3, 8, 2


def small_trace():
    g = torch.Generator().manual_seed(0)
    steps = []
    for t in (3, 0, 5):
        ids = torch.stack([torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(t)]) if t else
                           torch.zeros(0, K, dtype=torch.long) for _ in range(L)])
        steps.append(TraceStep(topk_ids=ids, topk_probs=torch.rand(L, t, K, generator=g), request_id=torch.arange(t),
                               position=torch.arange(t), phase=torch.zeros(t, dtype=torch.long),
                               source_rank=torch.arange(t) % 2,
                               hidden={0: (torch.arange(min(t, 2)), torch.randn(min(t, 2), 16, generator=g))}))
    return RoutingTrace(model="toy", num_layers=L, num_experts=E, topk=K, source="test", steps=steps)


@pytest.fixture
def trace_file(tmp_path):
    path = tmp_path / "good.pt"
    save_trace(small_trace(), str(path))
    return path


def _set(blob, dotted, value):
    *head, last = dotted.split(".")
    d = blob
    for k in head:
        d = d[int(k)] if isinstance(d, list) else d[k]
    d[last] = value


TRACE_VARIANTS = {
    # name: (change to the saved dict, words in the message)
    "tensor_not_dict": (lambda b: torch.zeros(3), ["holds a Tensor", "megatron_probe.trace"]),
    "list_not_dict": (lambda b: [b], ["holds a list"]),
    "predictor_given": (lambda b: {"format": "megatron_probe.predictor", "version": 1}, ["a predictor state file"]),
    "version_2": (lambda b: {**b, "version": 2}, ["trace version 2 is not supported"]),
    "unknown_top_field": (lambda b: {**b, "layers": []}, ["unknown fields ['layers']"]),
    "no_meta": (lambda b: {k: v for k, v in b.items() if k != "meta"}, ["no field 'meta'"]),
    "missing_num_layers": (lambda b: b["meta"].pop("num_layers") and b, ["no field 'meta.num_layers'"]),
    "renamed_meta_field": (lambda b: b["meta"].update(experts=b["meta"].pop("num_experts")) or b,
                           ["unknown fields ['experts']"]),
    "string_num_layers": (lambda b: _set(b, "meta.num_layers", "3") or b,
                          ["field 'meta.num_layers' is '3' (a string), expected an integer"]),
    "float_topk": (lambda b: _set(b, "meta.topk", 2.0) or b, ["field 'meta.topk' is 2.0 (a float)"]),
    "zero_layers": (lambda b: _set(b, "meta.num_layers", 0) or b, ["field 'meta.num_layers' is 0", ">= 1"]),
    "topk_above_experts": (lambda b: _set(b, "meta.topk", 9) or b, ["field 'meta.topk' is 9", "in 1..8"]),
    "no_steps": (lambda b: _set(b, "steps", []) or b, ["field 'steps' is empty"]),
    "steps_not_list": (lambda b: _set(b, "steps", {"0": 1}) or b, ["field 'steps' is {'0': 1} (an object), expected a list"]),
    "heat_width": (lambda b: _set(b, "heat", torch.zeros(L, E + 1, dtype=torch.long)) or b,
                   ["field 'heat' has shape (3, 9), expected (3, 8)"]),
    "heat_float": (lambda b: _set(b, "heat", b["heat"].float()) or b, ["field 'heat' has dtype torch.float32",
                                                                         "integer dtype"]),
    "heat_negative": (lambda b: _set(b, "heat", -b["heat"] - 1) or b, ["'heat' has a negative count"]),
    "heat_list": (lambda b: _set(b, "heat", [[1] * E] * L) or b, ["field 'heat' is [[1", "expected a tensor"]),
    "renamed_step_field": (lambda b: b["steps"][0].update(expert_ids=b["steps"][0].pop("topk_ids")) or b,
                           ["steps[0] has unknown fields ['expert_ids']"]),
    "missing_topk_ids": (lambda b: (b["steps"][2].pop("topk_ids"), b)[1], ["no field 'steps[2].topk_ids'"]),
    "float_ids": (lambda b: _set(b, "steps.0.topk_ids", b["steps"][0]["topk_ids"].float()) or b,
                  ["field 'steps[0].topk_ids' has dtype torch.float32, expected an integer dtype"]),
    "missing_layer": (lambda b: _set(b, "steps.0.topk_ids", b["steps"][0]["topk_ids"][:2]) or b,
                      ["field 'steps[0].topk_ids' has shape (2, 3, 2), expected (3, *, 2)"]),
    "ids_width": (lambda b: _set(b, "steps.2.topk_ids", torch.zeros(L, 5, K + 1, dtype=torch.int16)) or b,
                  ["field 'steps[2].topk_ids' has shape (3, 5, 3)"]),
    "expert_out_of_range": (lambda b: b["steps"][0]["topk_ids"].__setitem__((0, 0, 0), E) or b,
                            ["steps[0].topk_ids' has expert id 8; expected 0..7"]),
    "probs_int": (lambda b: _set(b, "steps.0.topk_probs", b["steps"][0]["topk_probs"].int()) or b,
                  ["'steps[0].topk_probs' has dtype torch.int32, expected a floating-point dtype"]),
    "request_id_short": (lambda b: _set(b, "steps.0.request_id", torch.arange(2)) or b,
                         ["'steps[0].request_id' has shape (2,), expected (3,)"]),
    "hidden_not_dict": (lambda b: _set(b, "steps.0.hidden", [1, 2]) or b, ["'steps[0].hidden' is a list"]),
    "hidden_bad_layer": (lambda b: _set(b, "steps.0.hidden", {7: b["steps"][0]["hidden"][0]}) or b,
                         ["has layer key 7; expected an integer in -1..2"]),
    "hidden_index_out_of_range": (lambda b: _set(b, "steps.0.hidden", {0: (torch.tensor([0, 3]),
                                                                         b["steps"][0]["hidden"][0][1])}) or b,
                                  ["'steps[0].hidden[0].token_index' has token 3; expected 0..2"]),
    "hidden_rows_mismatch": (lambda b: _set(b, "steps.0.hidden", {0: (torch.tensor([0]),
                                                                    b["steps"][0]["hidden"][0][1])}) or b,
                             ["'steps[0].hidden[0].states' has shape (2, 16), expected (1, *)"]),
}


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "random", "folder"])
def test_trace_pt_broken_bytes(trace_file, tmp_path, kind):
    bad = byte_variant(trace_file, tmp_path, kind)
    words = BYTE_WORDS.get(kind) or ("cut off or corrupt" if kind == "truncated" else "not a torch.save file")
    for loader in (load_trace, load_any):
        refused(lambda: loader(str(bad)), bad, words, error=TraceFormatError)


@pytest.mark.parametrize("name", sorted(TRACE_VARIANTS))
def test_trace_pt_bad_contents(trace_file, name):
    change, words = TRACE_VARIANTS[name]
    blob = torch.load(trace_file, weights_only=True)
    torch.save(change(blob), trace_file)
    refused(lambda: load_trace(str(trace_file)), trace_file, *words, error=TraceFormatError)


def test_trace_pt_other_kinds_of_file(tmp_path):
    wl = tmp_path / "workload.pt"
    small_workload().save(str(wl))
    refused(lambda: load_trace(str(wl)), wl, "holds JSON text, not a torch.save file", error=TraceFormatError)
    pred = tmp_path / "pred.pt"
    torch.save({"format": "megatron_probe.predictor", "version": 1, "meta": {}, "state": {}}, pred)
    refused(lambda: load_any(str(pred)), pred, "format='megatron_probe.predictor': a predictor state file",
            error=TraceFormatError)
    # an object of a class no weights-only load allows (numpy arrays would not do: importing
    # megatron.core adds them to torch's safe globals)
    obj_file = tmp_path / "object.pt"
    torch.save({"format": "megatron_probe.trace", "heat": PickledObject()}, obj_file)
    refused(lambda: load_trace(str(obj_file)), obj_file, "weights-only load refuses", error=TraceFormatError)


class PickledObject:
    """A class of this test module: never among torch's safe globals."""


def test_trace_against_the_checkpoint(tmp_path):
    tr = small_trace()
    cfg = TinyMoEConfig(num_layers=L, hidden_size=16, num_attention_heads=2, num_experts=E, topk=K)
    check_trace_for_checkpoint(tr, "t.pt", cfg, hidden_layer=0)
    refused(lambda: check_trace_for_checkpoint(tr, "t.pt", dataclasses.replace(cfg, num_experts=16)), "t.pt",
            "field 'meta.num_experts' is 8, expected 16", "another model")
    refused(lambda: check_trace_for_checkpoint(tr, "t.pt", cfg, hidden_layer=1), "t.pt",
            "has no hidden states of layer 1")
    refused(lambda: check_trace_for_checkpoint(tr, "t.pt", cfg, hidden_layer=0, min_tokens=6), "t.pt",
            "of at least 6 tokens")
    refused(lambda: check_trace_for_checkpoint(tr, "t.pt", dataclasses.replace(cfg, hidden_size=32), hidden_layer=0),
            "t.pt", "states of width 16, expected the checkpoint's hidden_size 32")


# ---------------------------------------------------------------------------- route CSV (BigMoeOnEdge)
CSV_PRE = "# route_trace v1\n# model=x.gguf arch=y n_layer=2 n_expert=4 n_expert_used=2\n# layer=0 expert_bytes=1\n"
CSV_HEAD = "turn,phase,step,layer,slot,expert,weight,residency,expert_bytes\n"


def _csv_rows():
    rows = []
    for step, phase, layers in ((0, 0, [0]), (1, 0, [0]), (2, 1, [0, 1]), (3, 1, [0, 1])):
        rows += [[0, phase, step, l, s, (l + s + step) % 4, 0.5, 1, 10] for l in layers for s in range(2)]
    return rows


def _write_csv(path, rows=None, pre=CSV_PRE, head=CSV_HEAD, tail="\n"):
    body = "\n".join(",".join(str(x) for x in r) for r in (_csv_rows() if rows is None else rows))
    path.write_text(pre + head + body + (tail if body else ""))
    return path


def _csv_with(i, col, value):
    rows = _csv_rows()
    rows[i][col] = value
    return rows


CSV_VARIANTS = {
    "renamed_header": (dict(head=CSV_HEAD.replace("expert,", "expert_id,")), ["unknown header", "expert_id"]),
    "other_layout_v2": (dict(pre=CSV_PRE.replace("v1", "v2")), ["first line must be '# route_trace v1'"]),
    "no_preamble": (dict(pre=""), ["first line must be '# route_trace v1', got '(none)'"]),
    "no_n_layer": (dict(pre=CSV_PRE.replace("n_layer=2 ", "")), ["preamble has no n_layer="]),
    "text_n_layer": (dict(pre=CSV_PRE.replace("n_layer=2", "n_layer=two")),
                     ["preamble field n_layer='two', expected an integer >= 1"]),
    "zero_layers": (dict(pre=CSV_PRE.replace("n_layer=2", "n_layer=0")), ["n_layer='0', expected an integer >= 1"]),
    "topk_above_experts": (dict(pre=CSV_PRE.replace("n_expert_used=2", "n_expert_used=5")),
                           ["n_expert_used=5 exceeds n_expert=4"]),
    "only_preamble": (dict(head="", rows=[]), ["no CSV rows"]),
    "header_only": (dict(rows=[]), ["no data rows after the header"]),
    "float_expert": (dict(rows=_csv_with(0, 5, 1.5)), ["line 5: field 'expert' is '1.5', expected an integer"]),
    "text_layer": (dict(rows=_csv_with(3, 3, "L1")), ["line 8: field 'layer' is 'L1', expected an integer"]),
    "text_weight": (dict(rows=_csv_with(0, 6, "heavy")), ["field 'weight' is 'heavy', expected a finite number"]),
    "few_fields": (dict(rows=[r[:7] if i == 2 else r for i, r in enumerate(_csv_rows())]),
                   ["line 7 has 7 fields, expected 9"]),
    "expert_out_of_range": (dict(rows=_csv_with(0, 5, 9)), ["line 5: expert 9 outside 0..3"]),
    "layer_out_of_range": (dict(rows=_csv_with(0, 3, 2)), ["line 5: layer 2 outside 0..1"]),
    "bad_phase": (dict(rows=_csv_with(0, 1, 2)), ["field 'phase' is 2, expected 0 (prefill) or 1 (decode)"]),
    "duplicate_row": (dict(rows=_csv_rows() + [_csv_rows()[-1]]), ["appears twice"]),
    "missing_layer": (dict(rows=[r for r in _csv_rows() if not (r[2] == 3 and r[3] == 1)]),
                      ["token turn=0 step=3 has no rows for layers [1]"]),
    "missing_slot": (dict(rows=[r for r in _csv_rows() if not (r[2] == 3 and r[3] == 1 and r[4] == 1)]),
                     ["layer 1 has 1 of 2 slots"]),
    "no_final_newline": (dict(tail=""), ["is cut off (the file does not end with a newline"]),
    "json_given": (dict(pre='{"format": "megatron_probe.workload"}\n', head=""), ["first line must be"]),
}


@pytest.mark.parametrize("name", sorted(CSV_VARIANTS))
def test_route_csv_bad_contents(tmp_path, name):
    kw, words = CSV_VARIANTS[name]
    path = _write_csv(tmp_path / "t.route.csv", **kw)
    refused(lambda: load_any(str(path)), path, *words, error=TraceFormatError)


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "random", "folder"])
def test_route_csv_broken_bytes(tmp_path, kind):
    good = _write_csv(tmp_path / "good.route.csv")
    assert load_route_csv(str(good)).num_layers == 2
    bad = byte_variant(good, tmp_path, kind)
    words = BYTE_WORDS.get(kind) or ("is cut off" if kind == "truncated" else "not a text file")
    refused(lambda: load_route_csv(str(bad)), bad, words, error=TraceFormatError)


@needs_shared
def test_shared_route_csv_cut_off(tmp_path):
    """The real per-token trace, cut in half (mid-line): refused, never read as a shorter trace."""
    data = open(QWEN_CSV, "rb").read()
    bad = tmp_path / "qwen3-30b-a3b.route.csv"
    bad.write_bytes(data[: len(data) // 2])
    refused(lambda: load_any(str(bad)), bad, "is cut off", error=TraceFormatError)
    # cut at a line end: the tokens of the last step lack layers
    text = data.decode()
    cut = text[: text.index("\n", len(text) // 2) + 1]
    bad.write_text(cut)
    refused(lambda: load_any(str(bad)), bad, "has no rows for layers", error=TraceFormatError)


# ---------------------------------------------------------------------------- coactivation JSON (mbolt)
def _coact(**over):
    data = {"model": "m", "n_layers": 2, "n_expert_per_layer": 4, "k": 2, "n_decode_tokens": 10,
            "layers": [{"layer": 0, "heat": [5, 5, 5, 5]}, {"layer": 1, "heat": [10, 6, 2, 2]}]}
    data.update(over)
    return data


COACT_VARIANTS = {
    "top_level_list": ([{"heat": [1, 2, 3, 4]}], ["the top level is a list, expected an object"]),
    "layers_as_dict": (_coact(layers={"0": {"heat": [1] * 4}, "1": {"heat": [1] * 4}}),
                       ["field 'layers' is {'0'", "(an object), expected a list"]),
    "renamed_field": ({**{k: v for k, v in _coact().items() if k != "n_expert_per_layer"}, "n_experts": 4},
                      ["no 'n_expert_per_layer' field", "n_experts"]),
    "missing_layers": (_coact(layers=[{"heat": [1] * 4}]), ["1 layers listed, n_layers says 2 (missing layers)"]),
    "layers_out_of_order": (_coact(layers=[{"layer": 1, "heat": [1] * 4}, {"layer": 0, "heat": [1] * 4}]),
                            ["'layers[0].layer' is 1, expected 0 (layers out of order or missing)"]),
    "float_heat": (_coact(layers=[{"heat": [5.0, 5, 5, 5]}, {"heat": [1] * 4}]),
                   ["field layers[0].heat[0] is 5.0 (a float), expected an integer >= 0"]),
    "string_heat": (_coact(layers=[{"heat": [1] * 4}, {"heat": ["1", 1, 1, 1]}]), ["layers[1].heat[0] is '1'"]),
    "negative_heat": (_coact(layers=[{"heat": [1] * 4}, {"heat": [1, -1, 1, 1]}]), ["layers[1].heat[1] is -1"]),
    "heat_width": (_coact(layers=[{"heat": [1] * 4}, {"heat": [1] * 3}]), ["layer 1 heat has 3 entries, expected 4"]),
    "no_heat": (_coact(layers=[{"heat": [1] * 4}, {"hot": [1] * 4}]), ["layer 1 heat has None entries, expected 4"]),
    "string_n_layers": (_coact(n_layers="2"), ["field 'n_layers' is '2' (a string), expected an integer"]),
    "zero_layers": (_coact(n_layers=0, layers=[]), ["field 'n_layers' is 0, expected an integer >= 1"]),
    "zero_tokens": (_coact(n_decode_tokens=0), ["field 'n_decode_tokens' is 0, expected an integer >= 1"]),
    "k_above_experts": (_coact(k=5), ["field 'k' is 5, expected an integer in 1..4"]),
    "heat_above_tokens": (_coact(n_decode_tokens=2), ["layer 0 heat sums to 20, more than n_decode_tokens x k = 4"]),
    "workload_given": ({"format": "megatron_probe.workload", "version": 1, "requests": []},
                       ["a serving workload file (format='megatron_probe.workload'), not an mbolt coactivation JSON"]),
}


@pytest.mark.parametrize("name", sorted(COACT_VARIANTS))
def test_coactivation_json_bad_contents(tmp_path, name):
    data, words = COACT_VARIANTS[name]
    path = tmp_path / "coactivation_m.json"
    path.write_text(json.dumps(data))
    refused(lambda: load_any(str(path)), path, *words, error=TraceFormatError)


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "random"])
def test_coactivation_json_broken_bytes(tmp_path, kind):
    good = tmp_path / "coactivation_good.json"
    good.write_text(json.dumps(_coact(), indent=1))
    assert load_coactivation_json(str(good)).heat.shape == (2, 4)
    bad = byte_variant(good, tmp_path, kind)
    words = BYTE_WORDS.get(kind) or ("the file is cut off (truncated?)" if kind == "truncated" else "not a text file")
    refused(lambda: load_coactivation_json(str(bad)), bad, words, error=TraceFormatError)


@needs_shared
def test_shared_coactivation_json_cut_off(tmp_path):
    data = open(QWEN_AGG, "rb").read()
    bad = tmp_path / "coactivation_qwen3-30b-a3b.json"
    bad.write_bytes(data[: len(data) // 2])
    refused(lambda: load_any(str(bad)), bad, "not JSON", "the file is cut off (truncated?)", error=TraceFormatError)


# ---------------------------------------------------------------------------- workloads
def small_workload(n=3):
    reqs = [Request(i, 2 * i, "python", "f.py", 4, 3, "abc", "de", list(range(4)), list(range(3))) for i in range(n)]
    return Workload("shift", "d", "s", "tok", reqs, {"seed": 0})


def _req(data, i, **over):
    data["requests"][i].update(over)
    return data


WORKLOAD_VARIANTS = {
    "top_level_list": (lambda d: d["requests"], ["the top level is a list, expected an object", "workload"]),
    "no_format": (lambda d: {k: v for k, v in d.items() if k != "format"}, ["(format=None)"]),
    "coactivation_given": (lambda d: _coact(), ["(format=None)", "valid: format 'megatron_probe.workload'"]),
    "version_2": (lambda d: {**d, "version": 2}, ["workload version 2 is not supported"]),
    "no_requests": (lambda d: {k: v for k, v in d.items() if k != "requests"}, ["lacks the fields ['requests']"]),
    "zero_requests": (lambda d: {**d, "requests": []}, ["field 'requests' is empty; expected at least one request"]),
    "requests_dict": (lambda d: {**d, "requests": {"0": d["requests"][0]}},
                      ["field 'requests' is {'0'", "(an object), expected a list"]),
    "request_not_object": (lambda d: {**d, "requests": [1, 2]}, ["field 'requests[0]' is an integer"]),
    "renamed_field": (lambda d: d["requests"][1].update(prompt_len=d["requests"][1].pop("prompt_tokens")) or d,
                      ["request #1 lacks the fields ['prompt_tokens']"]),
    "unknown_field": (lambda d: _req(d, 0, priority=1), ["request #0 has unknown fields ['priority']"]),
    "float_tokens": (lambda d: _req(d, 2, prompt_tokens=4.0),
                     ["field 'requests[2].prompt_tokens' is 4.0 (a float), expected an integer"]),
    "string_arrival": (lambda d: _req(d, 0, arrival_step="0"), ["field 'requests[0].arrival_step' is '0' (a string)"]),
    "bool_id": (lambda d: _req(d, 0, id=True), ["field 'requests[0].id' is True (a boolean), expected an integer"]),
    "zero_output": (lambda d: _req(d, 1, output_tokens=0), ["request 1 has prompt_tokens=4, output_tokens=0",
                                                             "expected prompt_tokens >= 1"]),
    "negative_arrival": (lambda d: _req(d, 1, arrival_step=-1), ["arrival_step=-1 (requests[1])"]),
    "ids_length": (lambda d: _req(d, 0, prompt_ids=[1, 2]), ["field 'requests[0].prompt_ids' has 2 entries, expected 4"]),
    "float_ids": (lambda d: _req(d, 0, output_ids=[1, 2.5, 3]),
                  ["field requests[0].output_ids[1] is 2.5 (a float), expected an integer >= 0"]),
    "duplicate_id": (lambda d: _req(d, 2, id=0), ["field 'requests[2].id' is 0, the id of requests[0] too"]),
    "string_scenario": (lambda d: {**d, "scenario": 3}, ["field 'scenario' is 3 (an integer), expected a string"]),
}


@pytest.fixture
def workload_file(tmp_path):
    path = tmp_path / "w.json"
    small_workload().save(str(path))
    return path


@pytest.mark.parametrize("name", sorted(WORKLOAD_VARIANTS))
def test_workload_bad_contents(workload_file, name):
    change, words = WORKLOAD_VARIANTS[name]
    workload_file.write_text(json.dumps(change(json.loads(workload_file.read_text()))))
    refused(lambda: Workload.load(str(workload_file)), workload_file, *words)


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "random", "folder", "trace_given"])
def test_workload_broken_bytes(workload_file, tmp_path, kind):
    if kind == "trace_given":
        bad = tmp_path / "trace.json"
        save_trace(small_trace(), str(bad))
        words = "is a torch.save (zip) archive, not a text file"
    else:
        bad = byte_variant(workload_file, tmp_path, kind)
        words = BYTE_WORDS.get(kind) or ("cut off (truncated?)" if kind == "truncated" else "not a text file")
    refused(lambda: Workload.load(str(bad)), bad, words, "workload")


def test_workload_against_the_model(workload_file):
    wl = Workload.load(str(workload_file))
    check_workload_fits(wl, "w.json", vocab_size=4, max_positions=6)
    refused(lambda: check_workload_fits(wl, "w.json", vocab_size=3), "w.json",
            "'requests[0].prompt_ids' holds token id 3, expected ids below the model's vocab_size 3")
    refused(lambda: check_workload_fits(wl, "w.json", vocab_size=4, max_positions=5), "w.json",
            "requests[0] needs 6 positions")
    wl.requests[1].output_ids = None
    check_workload_fits(wl, "w.json", vocab_size=4, need_ids=False)
    refused(lambda: check_workload_fits(wl, "w.json", vocab_size=4), "w.json", "requests[1] has no output_ids")


# ---------------------------------------------------------------------------- checkpoints
TINY = TinyMoEConfig(num_layers=2, hidden_size=8, num_attention_heads=2, num_experts=8, topk=2, expert_ffn_hidden=4,
                     seq_length=64, vocab_size=4096)


def make_checkpoint(folder, cfg=TINY, seed=0):
    """A checkpoint folder of ``cfg`` (random bf16 weights, the shipped tokenizer)."""
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(shape, generator=g).to(torch.bfloat16) for k, shape in expected_state_shapes(cfg).items()}
    torch.save(sd, os.path.join(folder, "model.pt"))
    cfg.to_json(os.path.join(folder, "config.json"))
    shutil.copy(os.path.join(SHIPPED, "tokenizer.json"), os.path.join(folder, "tokenizer.json"))
    return str(folder)


@pytest.fixture
def ckpt(tmp_path):
    return make_checkpoint(tmp_path / "ckpt")


def _config_json(ckpt, change):
    p = os.path.join(ckpt, "config.json")
    with open(p) as f:
        data = json.load(f)
    with open(p, "w") as f:
        json.dump(change(data), f)
    return p


CONFIG_VARIANTS = {
    "top_level_list": (lambda d: [d], ["the top level is a list, expected an object"]),
    "other_format": (lambda d: {**d, "format": "megatron_probe.workload"}, ["format 'megatron_probe.workload' is not",
                                                                            "a serving workload file"]),
    "missing_field": (lambda d: {k: v for k, v in d.items() if k != "num_experts"}, ["no field 'num_experts'"]),
    "unknown_field": (lambda d: {**d, "experts": 4}, ["unknown config fields ['experts']"]),
    "float_layers": (lambda d: {**d, "num_layers": 2.0}, ["field 'num_layers' is 2.0 (a float), expected an integer"]),
    "string_experts": (lambda d: {**d, "num_experts": "4"}, ["field 'num_experts' is '4' (a string)"]),
    "zero_layers": (lambda d: {**d, "num_layers": 0}, ["field 'num_layers' is 0, expected an integer >= 1"]),
    "topk_above_experts": (lambda d: {**d, "topk": 9}, ["field 'topk' is 9, expected <= num_experts (8)"]),
    "heads": (lambda d: {**d, "num_attention_heads": 3}, ["field 'num_attention_heads' is 3, expected a divisor"]),
    "score_function": (lambda d: {**d, "score_function": "relu"}, ["field 'score_function' is 'relu'"]),
}


@pytest.mark.parametrize("name", sorted(CONFIG_VARIANTS))
def test_checkpoint_config_bad_contents(ckpt, name):
    change, words = CONFIG_VARIANTS[name]
    p = _config_json(ckpt, change)
    refused(lambda: read_checkpoint(ckpt), p, *words, error=InputFileError)


def _state(ckpt, change):
    p = os.path.join(ckpt, "model.pt")
    torch.save(change(torch.load(p, weights_only=True)), p)
    return p


STATE_VARIANTS = {
    "tensor": (lambda sd: torch.zeros(3), ["holds a Tensor, expected the model's state dict"]),
    "list": (lambda sd: list(sd.values()), ["holds a list"]),
    "missing_key": (lambda sd: {k: v for k, v in sd.items() if "layers.1.mlp.router" not in k},
                    ["missing keys ['decoder.layers.1.mlp.router.weight']", "a checkpoint of another model?"]),
    "extra_key": (lambda sd: {**sd, "output_layer.weight": torch.zeros(1)}, ["unexpected keys ['output_layer.weight']"]),
    "wrong_shape": (lambda sd: {**sd, "decoder.layers.0.mlp.router.weight": torch.zeros(8, 16)},
                    ["key 'decoder.layers.0.mlp.router.weight' has shape (8, 16), expected (8, 8)"]),
    "int_weights": (lambda sd: {**sd, "decoder.final_layernorm.weight": torch.ones(8, dtype=torch.int64)},
                    ["key 'decoder.final_layernorm.weight' has dtype torch.int64, expected a floating-point dtype"]),
    "not_a_tensor": (lambda sd: {**sd, "decoder.final_layernorm.weight": [1.0] * 8},
                     ["key 'decoder.final_layernorm.weight' is [1.0", "expected a tensor"]),
}


@pytest.mark.parametrize("name", sorted(STATE_VARIANTS))
def test_checkpoint_state_bad_contents(ckpt, name):
    change, words = STATE_VARIANTS[name]
    p = _state(ckpt, change)
    refused(lambda: read_checkpoint(ckpt), p, *words, error=InputFileError)


def test_checkpoint_of_another_model(tmp_path, ckpt):
    """model.pt of one model beside the config.json of another: refused naming the first key."""
    other = make_checkpoint(tmp_path / "other", dataclasses.replace(TINY, num_experts=16))
    shutil.copy(os.path.join(other, "model.pt"), os.path.join(ckpt, "model.pt"))
    refused(lambda: read_checkpoint(ckpt), os.path.join(ckpt, "model.pt"), "unexpected keys",
            "a checkpoint of another model?", error=InputFileError)
    shutil.copy(os.path.join(other, "config.json"), os.path.join(ckpt, "config.json"))
    cfg, _, _ = read_checkpoint(ckpt)
    assert cfg.num_experts == 16
    other = make_checkpoint(tmp_path / "wide", dataclasses.replace(TINY, hidden_size=16))
    shutil.copy(os.path.join(other, "model.pt"), os.path.join(ckpt, "model.pt"))
    TINY.to_json(os.path.join(ckpt, "config.json"))
    refused(lambda: read_checkpoint(ckpt), os.path.join(ckpt, "model.pt"), "has shape (4096, 16), expected (4096, 8)",
            error=InputFileError)


@pytest.mark.parametrize("name, kind", [(n, k) for n in ("config.json", "tokenizer.json", "model.pt")
                                        for k in ("missing", "empty", "truncated", "random")])
def test_checkpoint_files_broken_bytes(ckpt, tmp_path, name, kind):
    p = os.path.join(ckpt, name)
    bad = byte_variant(p, tmp_path, kind)
    os.remove(p)
    if kind == "missing":
        refused(lambda: read_checkpoint(ckpt), ckpt, f"has no {name}", error=InputFileError)
        return
    shutil.move(str(bad), p)
    words = {"empty": "empty file (0 bytes)"}.get(kind)
    if words is None and name == "model.pt":
        words = "cut off or corrupt" if kind == "truncated" else "not a torch.save file"
    elif words is None and name == "config.json":
        words = "cut off (truncated?)" if kind == "truncated" else "not a text file"
    elif words is None:
        words = "not a tokenizers JSON file"
    refused(lambda: read_checkpoint(ckpt), p, words, error=InputFileError)


def test_checkpoint_folder_itself(tmp_path, ckpt):
    refused(lambda: read_checkpoint(str(tmp_path / "nowhere")), tmp_path / "nowhere", "does not exist",
            error=InputFileError)
    refused(lambda: read_checkpoint(os.path.join(ckpt, "model.pt")), "model.pt", "is a file, not a folder",
            error=InputFileError)


@needs_shipped
def test_shipped_checkpoint_passes_every_check():
    """The shape table the checks use is the real model's: the shipped checkpoint, its predictor
    state and its workloads pass."""
    cfg, tok, sd = read_checkpoint(SHIPPED)
    assert len(sd) == len(expected_state_shapes(cfg))
    check_predictor_state(os.path.join(SHIPPED, "predictor.pt"), cfg, sd, 256)
    wl = Workload.load(SHIFT)
    check_workload_fits(wl, SHIFT, cfg.vocab_size, cfg.seq_length)


# ---------------------------------------------------------------------------- predictor states
D = 6


def make_predictor(path, ckpt, D=D, layer0=True):
    cfg, _, sd = read_checkpoint(ckpt)
    spec = RouterSpec(cfg.num_experts, cfg.topk, cfg.score_function, pre_softmax=cfg.topk == 1)
    routers = [(sd[f"decoder.layers.{l}.mlp.router.weight"].float(), None, None) for l in range(cfg.num_layers)]
    PredictorSet.from_routers(routers, spec, D, layer0=layer0).save(str(path), extra={"note": "test"})
    return cfg, sd, routers, spec


def _pred_set(path, change):
    blob = torch.load(path, weights_only=True)
    torch.save(change(blob), path)


PRED_VARIANTS = {
    "tensor": (lambda b: torch.zeros(2), ["holds a Tensor", "megatron_probe.predictor"]),
    "trace_given": (lambda b: {"format": "megatron_probe.trace", "version": 1}, ["a routing trace file"]),
    "version_2": (lambda b: {**b, "version": 2}, ["predictor state version 2 is not supported"]),
    "no_meta": (lambda b: {k: v for k, v in b.items() if k != "meta"}, ["no field 'meta'"]),
    "missing_meta_field": (lambda b: b["meta"].pop("hidden_size") and b, ["no field 'meta.hidden_size'"]),
    "string_hidden": (lambda b: _set(b, "meta.hidden_size", "8") or b, ["field 'meta.hidden_size' is '8'"]),
    "layers_out_of_range": (lambda b: _set(b, "meta.layers", [0, 1, 2]) or b,
                            ["field 'meta.layers' is [0, 1, 2], expected distinct layers", "within 0..1"]),
    "empty_layers": (lambda b: _set(b, "meta.layers", []) or b, ["field 'meta.layers' has 0 entries"]),
    "renamed_state_key": (lambda b: b["state"].update(
        {"predictors.1.w1": b["state"].pop("predictors.1.fc1.weight")}) or b,
        ["field 'state' has unknown fields ['predictors.1.w1']"]),
    "missing_state_key": (lambda b: b["state"].pop("predictors.0.fc2.weight") is None or b,
                          ["no field 'state.predictors.0.fc2.weight'"]),
    "wrong_shape": (lambda b: _set(b, "state", {**b["state"], "predictors.0.fc1.weight": torch.zeros(D, 9)}) or b,
                    ["field 'state.predictors.0.fc1.weight' has shape (6, 9), expected (6, 8)"]),
    "int_weights": (lambda b: _set(b, "state", {**b["state"], "predictors.1.fc2.weight": torch.zeros(8, D,
                                                                                               dtype=torch.int32)})
                    or b, ["'state.predictors.1.fc2.weight' has dtype torch.int32, expected a floating-point"]),
    "state_list": (lambda b: _set(b, "state", []) or b, ["field 'state' is [] (a list), expected an object"]),
}


@pytest.mark.parametrize("name", sorted(PRED_VARIANTS))
def test_predictor_state_bad_contents(ckpt, tmp_path, name):
    path = tmp_path / "pred.pt"
    cfg, sd, routers, spec = make_predictor(path, ckpt)
    check_predictor_state(str(path), cfg, sd, D)  # the good one passes
    change, words = PRED_VARIANTS[name]
    _pred_set(path, change)
    refused(lambda: check_predictor_state(str(path), cfg, sd, D), path, *words)
    refused(lambda: PredictorSet.from_routers(routers, spec, D).load(str(path)), path, *words)


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "random", "folder"])
def test_predictor_state_broken_bytes(ckpt, tmp_path, kind):
    good = tmp_path / "good.pt"
    cfg, sd, routers, spec = make_predictor(good, ckpt)
    bad = byte_variant(good, tmp_path, kind)
    words = BYTE_WORDS.get(kind) or ("cut off or corrupt" if kind == "truncated" else "not a torch.save file")
    refused(lambda: check_predictor_state(str(bad), cfg, sd, D), bad, words)
    refused(lambda: PredictorSet.from_routers(routers, spec, D).load(str(bad)), bad, words)


def test_predictor_state_of_another_model_or_shape(ckpt, tmp_path):
    path = tmp_path / "pred.pt"
    cfg, sd, _, _ = make_predictor(path, ckpt)
    other = make_checkpoint(tmp_path / "other", seed=1)  # same shapes, other router weights
    _, _, sd_other = read_checkpoint(other)
    refused(lambda: check_predictor_state(str(path), cfg, sd_other, D), path, "distilled for another model",
            "router fingerprint")
    refused(lambda: check_predictor_state(str(path), cfg, sd, 8), path, "residual_hidden is 6 there, 8 here")
    refused(lambda: check_predictor_state(str(path), cfg, sd, D, layer0=False), path, "layers is [0, 1] there, [1] here")
    wl = tmp_path / "w.json"
    small_workload().save(str(wl))
    refused(lambda: check_predictor_state(str(wl), cfg, sd, D), wl, "holds JSON text, not a torch.save file")


# ---------------------------------------------------------------------------- hardware profiles, JSON results
def _profile(tmp_path, **over):
    data = dataclasses.asdict(PRESETS["h100-sxm"])
    data.update(over)
    path = tmp_path / "hw.json"
    path.write_text(json.dumps(data))
    return path


PROFILE_VARIANTS = {
    "list": ([1, 2], ["the top level is a list, expected an object"]),
    "unknown_field": (dict(peak=1.0), ["unknown hardware profile fields ['peak']"]),
    "missing_field": ("drop:peak_tflops", ["no field 'peak_tflops'"]),
    "string_number": (dict(peak_tflops="989"), ["field 'peak_tflops' is '989' (a string), expected a finite number"]),
    "negative": (dict(nvlink_gbps=-1.0), ["field 'nvlink_gbps' is -1.0, expected a number > 0"]),
    "eta_above_one": (dict(gemm_eta_max=2.0), ["field 'gemm_eta_max' is 2.0, expected a number in (0, 1]"]),
    "float_gpus": (dict(gpus_per_node=8.0), ["field 'gpus_per_node' is 8.0 (a float), expected an integer"]),
}


@pytest.mark.parametrize("name", sorted(PROFILE_VARIANTS))
def test_hardware_profile_bad_contents(tmp_path, name):
    change, words = PROFILE_VARIANTS[name]
    if isinstance(change, list):
        path = tmp_path / "hw.json"
        path.write_text(json.dumps(change))
    elif isinstance(change, str):
        path = _profile(tmp_path)
        data = json.loads(path.read_text())
        del data[change.split(":")[1]]
        path.write_text(json.dumps(data))
    else:
        path = _profile(tmp_path, **change)
    refused(lambda: get_profile(str(path)), path, *words)


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "random"])
def test_hardware_profile_broken_bytes(tmp_path, kind):
    good = _profile(tmp_path)
    assert get_profile(str(good)).name == "h100-sxm"
    bad = byte_variant(good, tmp_path, kind)  # keeps the .json suffix: read as a profile file, not a preset name
    words = BYTE_WORDS.get(kind) or ("cut off (truncated?)" if kind == "truncated" else "not a text file")
    refused(lambda: get_profile(str(bad)), bad, words)


def test_predictor_evaluation_json(tmp_path):
    from megatron_probe.sim.error_model import measured_predictor_error

    good = {"ep": 8, "scenario": "shift", "methods": {"distilled": {"mean_rank_load_err": 0.05, "mean_count_err": 0.08,
                                                                    "mean_topk_acc": 0.9}}}
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(good))
    assert measured_predictor_error(str(path))["rank_load_err"] == 0.05
    for data, words in (([good], "the top level is a list"), ({**good, "ep": "8"}, "field 'ep' is '8'"),
                        ({"ep": 8, "results": {}}, "no field 'methods'"),
                        ({**good, "methods": {"frozen": {}}}, "no field 'methods.distilled'"),
                        ({**good, "methods": {"distilled": {**good["methods"]["distilled"], "mean_count_err": "x"}}},
                         "field 'methods.distilled.mean_count_err' is 'x'")):
        path.write_text(json.dumps(data))
        refused(lambda: measured_predictor_error(str(path)), path, words)


def _tool_module(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.join(TOOLS, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _bench_json(tmp_path, **over):
    data = {"workload": "shift", "ep": 2, "layers": 4, "replica_slots": 3, "steps": [0, 5, 9], "static_ms": 10.0,
            "oracle_ms": 9.0, "copies": 4, "copy_charge_us": 100.0,
            "expert_cost_us": {"per_token": 1.0, "per_active_expert": 50.0}}
    data.update(over)
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(data))
    return path


def test_benchmark_result_json(tmp_path):
    read_bench = _tool_module("validate_sim").read_bench
    assert read_bench(str(_bench_json(tmp_path)))["ep"] == 2
    for over, words in ((dict(expert_cost_us={"per_token": 1.0}), "no field 'expert_cost_us.per_active_expert'"),
                        (dict(steps=[0.0, 5]), "field steps[0] is 0.0 (a float), expected an integer"),
                        (dict(steps=[]), "field 'steps' has 0 entries"),
                        (dict(workload="../../etc/x"), "expected a workload name"),
                        (dict(static_ms=0), "field 'static_ms' is 0, expected a number > 0"),
                        (dict(layers="4"), "field 'layers' is '4' (a string)")):
        path = _bench_json(tmp_path, **over)
        refused(lambda: read_bench(str(path)), path, words)


def test_control_path_measurements(tmp_path, monkeypatch):
    from megatron_probe.sim import control

    bad = tmp_path / "bench_planner.json"
    bad.write_text(json.dumps({"configs": {"e32_ep2": {"E": 32, "ep": 2, "timings": {"split_time": {"p99_us": 3}}}}}))
    monkeypatch.setattr(control, "BENCH_PLANNER", str(bad))
    control._load.cache_clear()
    try:
        refused(lambda: control.check_measurements("host"), bad, "no field 'configs.e32_ep2.timings.split_time.median_us'")
        control.check_measurements("none")
    finally:
        control._load.cache_clear()


# ---------------------------------------------------------------------------- JSON lines
def test_jsonl_torn_and_bad_lines(tmp_path):
    path = tmp_path / "events.jsonl"
    rows = [{"rank": 0, "kind": "send", "t_start": i, "t_end": i + 1} for i in range(3)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text(text)
    assert read_jsonl(str(path)) == rows
    path.write_text(text + json.dumps(rows[0])[:17])  # the writer killed mid-line
    refused(lambda: read_jsonl(str(path)), path, "line 4 (the last, with no newline at its end) is cut off",
            "truncated")
    path.write_text(text.replace(json.dumps(rows[1]), '{"rank": 0, "kind": '))  # a bad line in the middle
    refused(lambda: read_jsonl(str(path)), path, "line 2 is not JSON")
    path.write_text(text + "[1, 2]\n")
    refused(lambda: read_jsonl(str(path)), path, "line 4 is a list, expected a JSON object")
    path.write_bytes(random_bytes())
    refused(lambda: read_jsonl(str(path)), path, "not a text file")
    refused(lambda: read_jsonl(str(tmp_path / "none.jsonl")), tmp_path / "none.jsonl", "no such file")
    path.write_text("")
    assert read_jsonl(str(path)) == []  # an empty log: no rows


# ---------------------------------------------------------------------------- the tools
def run_tool(name, *args, timeout=180):
    return subprocess.run([sys.executable, os.path.join(TOOLS, name), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def assert_refused(r, path, *words, outputs=()):
    """A run refused with exit code 2, the message naming ``path`` and ``words``, no traceback, and
    none of ``outputs`` written."""
    err = r.stderr
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    msg = err.strip().splitlines()[-1]
    assert "error: " in msg and str(path) in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    for o in outputs:
        assert not os.path.exists(o), o


_MODULES = {}


@pytest.fixture
def in_process(capsys):
    """Run a tool's ``main(argv)`` here; returns a CompletedProcess-like result (exit code, stderr)."""
    threads = torch.get_num_threads()

    def run(name, *args):
        if name not in _MODULES:
            _MODULES[name] = _tool_module(name)
        capsys.readouterr()
        try:
            code = _MODULES[name].main([str(x) for x in args])
        except SystemExit as e:
            code = e.code
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    yield run
    torch.set_num_threads(threads)


@pytest.fixture
def bad(tmp_path, ckpt):
    """One broken file of each kind (and a checkpoint folder holding a broken model.pt)."""
    out = {}
    good_trace = tmp_path / "t_good.pt"
    save_trace(small_trace(), str(good_trace))
    data = open(good_trace, "rb").read()
    (tmp_path / "trace_cut.pt").write_bytes(data[: len(data) // 2])
    out["trace"] = tmp_path / "trace_cut.pt"
    wl = tmp_path / "wl.json"
    small_workload().save(str(wl))
    d = json.loads(wl.read_text())
    d["requests"][1]["prompt_tokens"] = 4.5
    wl.write_text(json.dumps(d))
    out["workload"] = wl
    pred = tmp_path / "pred.pt"
    pred.write_bytes(random_bytes())
    out["predictor"] = pred
    broken = make_checkpoint(tmp_path / "broken_ckpt")
    open(os.path.join(broken, "model.pt"), "r+b").truncate(1000)
    out["checkpoint"], out["model.pt"] = broken, os.path.join(broken, "model.pt")
    hw = tmp_path / "hw.json"
    hw.write_text(json.dumps({"name": "x", "peak_tflops": "fast"}))
    out["hardware"] = hw
    coact = tmp_path / "coactivation_x.json"
    coact.write_text(json.dumps({"model": "m", "layers": {"0": {"heat": [1, 2]}}}))  # another top-level layout
    out["coactivation"] = coact
    return out


def test_run_probe_inference_refuses_bad_files(tmp_path, bad, ckpt, in_process):
    out = [tmp_path / "res.json", tmp_path / "rows.jsonl"]
    flags = ["--json", out[0], "--metrics-jsonl", out[1], "--quiet"]
    trace_as_workload = tmp_path / "shift_trace.pt"
    save_trace(small_trace(), str(trace_as_workload))
    out[0].write_text('{"old": 1}')  # an earlier run's result: a refused run leaves it as it was
    r = run_tool("run_probe_inference.py", "--workload", trace_as_workload, "--load", ckpt, *flags)
    assert_refused(r, trace_as_workload, "is a torch.save (zip) archive, not a text file", "workload",
                   outputs=out[1:])
    assert out[0].read_text() == '{"old": 1}'
    out[0].unlink()
    for args, path, words in (
            (["--workload", bad["workload"]], bad["workload"], "'requests[1].prompt_tokens' is 4.5 (a float)"),
            (["--load", bad["checkpoint"]], bad["model.pt"], "cut off or corrupt"),
            (["--probe-predictor-state", bad["predictor"]], bad["predictor"], "not a torch.save file"),
            (["--probe-hardware-profile", bad["hardware"]], bad["hardware"], "field 'peak_tflops' is 'fast'"),
            (["--regime", "scaled", "--trace", bad["trace"]], bad["trace"], "cut off or corrupt"),
    ):
        load = [] if "--load" in args else ["--load", ckpt]
        workload = [] if "--workload" in args else ["--workload", SHIFT]
        r = in_process("run_probe_inference", *args, *load, *workload, *flags)
        assert_refused(r, path, words, outputs=out)


@needs_shipped
def test_run_probe_inference_refuses_a_workload_of_another_tokenizer(tmp_path, in_process):
    data = json.load(open(SHIFT))
    data["requests"] = data["requests"][:2]
    data["requests"][1]["prompt_ids"][0] = 5000
    path = tmp_path / "other_tok.json"
    path.write_text(json.dumps(data))
    r = in_process("run_probe_inference", "--workload", path, "--json", tmp_path / "r.json")
    assert_refused(r, path, "holds token id 5000, expected ids below the model's vocab_size 4096",
                   outputs=[tmp_path / "r.json"])


def test_bench_moe_layer_refuses_bad_files(tmp_path, bad, ckpt):
    out = tmp_path / "bench.json"
    out.write_text('{"old": 1}')  # an earlier run's result: a refused run leaves it as it was
    r = run_tool("bench_moe_layer.py", "--checkpoint", bad["checkpoint"], "--trace", bad["trace"], "--json", out)
    assert_refused(r, bad["model.pt"], "cut off or corrupt")
    assert out.read_text() == '{"old": 1}'
    out.unlink()
    r = run_tool("bench_moe_layer.py", "--checkpoint", ckpt, "--predictor", bad["predictor"], "--json", out)
    assert_refused(r, bad["predictor"], "not a torch.save file", outputs=[out])
    r = run_tool("bench_moe_layer.py", "--checkpoint", ckpt, "--trace", bad["trace"], "--json", out)
    assert_refused(r, bad["trace"], "not a megatron_probe trace file", outputs=[out])


def test_record_traces_refuses_bad_files(tmp_path, bad, ckpt, in_process):
    out = tmp_path / "t.pt"
    r = run_tool("record_traces.py", "--checkpoint", ckpt, "--workload", bad["workload"], "--out", out)
    assert_refused(r, bad["workload"], "is 4.5 (a float), expected an integer", outputs=[out])
    wl = tmp_path / "good_wl.json"
    small_workload().save(str(wl))
    r = in_process("record_traces", "--checkpoint", bad["checkpoint"], "--workload", wl, "--out", out)
    assert_refused(r, bad["model.pt"], "cut off or corrupt", outputs=[out])


def test_distill_predictor_refuses_bad_files(tmp_path, bad, ckpt, in_process):
    out = [tmp_path / "p.pt", tmp_path / "fit.json"]
    r = run_tool("distill_predictor.py", "--checkpoint", ckpt, "--trace", bad["trace"], "--out", out[0],
                 "--json", out[1])
    assert_refused(r, bad["trace"], "cut off or corrupt", outputs=out)
    r = in_process("distill_predictor", "--checkpoint", bad["checkpoint"], "--out", out[0], "--json", out[1])
    assert_refused(r, bad["model.pt"], "cut off or corrupt", outputs=out)
    other = tmp_path / "other.pt"  # a good trace of another model (8 experts, the checkpoint has 4)
    save_trace(small_trace(), str(other))
    r = in_process("distill_predictor", "--checkpoint", ckpt, "--trace", other, "--out", out[0])
    assert_refused(r, other, "field 'meta.num_layers' is 3, expected 2", outputs=out)


def test_eval_predictor_refuses_bad_files(tmp_path, bad, ckpt, in_process):
    out = tmp_path / "eval.json"
    pred = tmp_path / "pred.pt"
    make_predictor(pred, make_checkpoint(tmp_path / "other", seed=3), D=256)  # distilled for another model
    r = run_tool("eval_predictor.py", "--checkpoint", ckpt, "--predictor", pred, "--ep", "2", "--json", out)
    assert_refused(r, pred, "distilled for another model", outputs=[out])
    r = in_process("eval_predictor", "--checkpoint", bad["checkpoint"], "--ep", "2", "--json", out)
    assert_refused(r, bad["model.pt"], "cut off or corrupt", outputs=[out])
    good = tmp_path / "good.pt"
    make_predictor(good, ckpt, D=256)
    r = in_process("eval_predictor", "--checkpoint", ckpt, "--predictor", good, "--workload", bad["workload"],
                   "--ep", "2", "--json", out)
    assert_refused(r, bad["workload"], "is 4.5 (a float)", outputs=[out])


def test_checkpoint_tools_refuse_a_bad_checkpoint(tmp_path, bad, ckpt):
    """routing_report, sample_tiny_moe and make_workloads read a checkpoint folder only."""
    out = [tmp_path / "routing.md", tmp_path / "routing.json"]
    r = run_tool("routing_report.py", "--checkpoint", bad["checkpoint"], "--out", out[0], "--json", out[1])
    assert_refused(r, bad["model.pt"], "cut off or corrupt", outputs=out)
    with open(os.path.join(ckpt, "tokenizer.json"), "r+b") as f:
        f.truncate(5000)
    r = run_tool("sample_tiny_moe.py", "--checkpoint", ckpt, "--out", out[0])
    assert_refused(r, os.path.join(ckpt, "tokenizer.json"), "not a tokenizers JSON file", outputs=[out[0]])
    cfg = _config_json(make_checkpoint(tmp_path / "c3"), lambda d: {**d, "seq_length": 16.5})
    wl_dir = tmp_path / "wl"
    r = run_tool("make_workloads.py", "--checkpoint", tmp_path / "c3", "--out", wl_dir, "--scenarios", "steady")
    assert_refused(r, cfg, "field 'seq_length' is 16.5 (a float), expected an integer", outputs=[wl_dir])


def test_simulator_tools_refuse_bad_files(tmp_path, bad, in_process):
    out = [tmp_path / "sim.json", tmp_path / "simdir"]
    r = run_tool("simulate.py", "--hardware", bad["hardware"], "--json", out[0], "--out-dir", out[1])
    assert_refused(r, bad["hardware"], "field 'peak_tflops' is 'fast'", outputs=out)
    ev = tmp_path / "eval.json"
    ev.write_text(json.dumps({"ep": 8, "methods": {"distilled": {"mean_rank_load_err": None}}}))
    r = in_process("simulate", "--predictor-eval", ev, "--json", out[0], "--out-dir", out[1])
    assert_refused(r, ev, "field 'methods.distilled.mean_rank_load_err' is None (null)", outputs=out)
    bench = _bench_json(tmp_path)
    data = json.loads(bench.read_text())
    data["expert_cost"] = data.pop("expert_cost_us")  # a renamed field
    bench.write_text(json.dumps(data))
    val = tmp_path / "val"
    r = run_tool("validate_sim.py", "--bench", bench, "--profile", "h200-sxm", "--out", val)
    assert_refused(r, bench, "no field 'expert_cost_us'", "expert_cost", outputs=[str(val) + ".json"])
    r = in_process("validate_sim", "--bench", _bench_json(tmp_path), "--profile", bad["hardware"], "--out", val)
    assert_refused(r, bad["hardware"], "field 'peak_tflops' is 'fast'", outputs=[str(val) + ".json"])


@needs_shared
def test_planner_tools_refuse_bad_files(tmp_path, bad, in_process):
    out = tmp_path / "ev.json"
    few = ["--steps", "12", "--eplb-window", "4", "--eplb-period", "6"]
    r = run_tool("eval_planner.py", "--trace", bad["coactivation"], *few, "--json", out)
    assert_refused(r, bad["coactivation"], "no 'n_layers' field", outputs=[out])
    cut = tmp_path / "qwen3-30b-a3b.route.csv"
    data = open(QWEN_CSV, "rb").read()
    cut.write_bytes(data[: len(data) // 2])
    wl = tmp_path / "workload.json"
    small_workload().save(str(wl))
    for args, path, words in ((["--trace", cut], cut, "is cut off"),
                              (["--trace", bad["trace"]], bad["trace"], "cut off or corrupt"),
                              (["--trace", wl], wl, "a serving workload file"),
                              (["--hardware", bad["hardware"]], bad["hardware"], "'peak_tflops' is 'fast'")):
        r = in_process("eval_planner", *args, *few, "--json", out)
        assert_refused(r, path, words, outputs=[out])
    r = run_tool("bench_balancer.py", "--hardware", bad["hardware"], "--json", out)
    assert_refused(r, bad["hardware"], "'peak_tflops' is 'fast'", outputs=[out])
    r = run_tool("bench_planner.py", "--hardware", bad["hardware"], "--json", out)
    assert_refused(r, bad["hardware"], "'peak_tflops' is 'fast'", outputs=[out])


def test_calibrate_hardware_refuses_an_unknown_base(tmp_path):
    out = tmp_path / "cpu.json"
    r = run_tool("calibrate_hardware.py", "--base", "h999", "--out", out)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "invalid choice: 'h999'" in r.stderr
    assert not out.exists()
