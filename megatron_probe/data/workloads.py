"""Serving workloads built from held-out text, and the step schedule a continuous-batching
engine derives from them.

File format (``megatron_probe.workload`` version 1, JSON): ``{"format", "version", "scenario",
"description", "source", "tokenizer", "requests": [{"id", "arrival_step", "domain", "source_file",
"prompt_tokens", "output_tokens", "prompt", "reference_output"}]}``. ``prompt`` and
``reference_output`` are text from one held-out document (the output is the document's true
continuation: replaying it teacher-forced routes exactly as greedy serving would route the same
tokens); lengths are in tokens of the named tokenizer.

Scenarios: ``steady`` (mixed domains, even arrivals), ``shift`` (one domain, then an abrupt
switch to another domain at a given step, the paper's Code -> Chinese test), ``repeat`` (a few
prompts duplicated: extreme skew), ``bursty`` (Poisson bursts of a single domain), ``prefill``
(prefill-heavy: long prompts, short outputs, many arrivals a step so that many prompts prefill at
once; the dominant domain switches half way, so the hot experts move), ``onset`` (light
mixed-domain traffic, then from a given step a burst of long prompts mostly from one domain: the
load, and with it the skew's cost, appears mid-run).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import torch

from megatron_probe import fileformat as ff
from megatron_probe.fileformat import check_format

WORKLOAD_FORMAT = "megatron_probe.workload"
WORKLOAD_VERSION = 1
SCENARIOS = ("steady", "shift", "repeat", "bursty", "prefill", "onset")
# prefill: share of a phase's requests from its dominant domain (the rest: any domain)
PREFILL_DOMINANT_SHARE = 0.75


def length_ranges(scenario: str, seq_length: int):
    """(prompt_range, output_range) in tokens for a model of ``seq_length`` positions."""
    if scenario == "prefill":  # long prompts, short outputs; their sum fits seq_length
        return (seq_length * 5 // 8, seq_length * 7 // 8), (max(2, seq_length // 32), max(2, seq_length // 16))
    return (max(4, seq_length // 10), seq_length // 2), (max(2, seq_length // 16), seq_length * 3 // 8)


@dataclass
class Request:
    id: int
    arrival_step: int
    domain: str
    source_file: str
    prompt_tokens: int
    output_tokens: int
    prompt: str
    reference_output: str
    prompt_ids: Optional[List[int]] = None  # token ids under the workload's tokenizer
    output_ids: Optional[List[int]] = None


@dataclass
class Workload:
    scenario: str
    description: str
    source: str
    tokenizer: str
    requests: List[Request] = field(default_factory=list)
    extra: Dict = field(default_factory=dict)

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"format": WORKLOAD_FORMAT, "version": WORKLOAD_VERSION, "scenario": self.scenario,
                       "description": self.description, "source": self.source, "tokenizer": self.tokenizer,
                       "extra": self.extra, "requests": [asdict(r) for r in self.requests]}, f, indent=1)

    @classmethod
    def load(cls, path: str) -> "Workload":
        """Read a ``megatron_probe.workload`` v1 file, checking every field (type, range, token id
        lists against their lengths, unique request ids, at least one request); raises
        :class:`~megatron_probe.fileformat.InputFileError` (a ValueError) naming the file, the field
        and what was expected."""
        data = ff.load_json(path, "a megatron_probe workload file (JSON with format 'megatron_probe.workload')")
        check_format(data, path, WORKLOAD_FORMAT, WORKLOAD_VERSION, "workload", ff.InputFileError)
        missing = [k for k in ("scenario", "description", "source", "tokenizer", "requests") if k not in data]
        if missing:
            raise ff.InputFileError(f"{path}: workload file lacks the fields {missing}")
        for key in ("scenario", "description", "source", "tokenizer"):
            ff.field(data, key, path, "str")
        extra = ff.field(data, "extra", path, "dict", default={})
        raw = ff.field(data, "requests", path, "list")
        if not raw:
            raise ff.InputFileError(f"{path}: field 'requests' is empty; expected at least one request")
        fields = [f for f in Request.__dataclass_fields__]
        required = [f for f in fields if f not in ("prompt_ids", "output_ids")]
        kinds = {"id": ("int", 0), "arrival_step": ("int", None), "prompt_tokens": ("int", None),
                 "output_tokens": ("int", None), "domain": ("str", None), "source_file": ("str", None),
                 "prompt": ("str", None), "reference_output": ("str", None)}
        reqs, seen = [], {}
        for i, r in enumerate(raw):
            w = f"requests[{i}]."
            if not isinstance(r, dict):
                raise ff.InputFileError(f"{path}: field 'requests[{i}]' is {ff.kind_of(r)}, expected an object "
                                        f"with the fields {required}")
            lack = [k for k in required if k not in r]
            extra_keys = sorted(set(r) - set(fields))
            if lack or extra_keys:
                raise ff.InputFileError(f"{path}: request #{i} lacks the fields {lack}" if lack else
                                        f"{path}: request #{i} has unknown fields {extra_keys}; valid: {fields}")
            for key, (kind, lo) in kinds.items():
                ff.field(r, key, path, kind, w, lo=lo)
            if r["prompt_tokens"] <= 0 or r["output_tokens"] <= 0 or r["arrival_step"] < 0:
                raise ff.InputFileError(f"{path}: request {r['id']} has prompt_tokens={r['prompt_tokens']}, "
                                        f"output_tokens={r['output_tokens']}, arrival_step={r['arrival_step']} "
                                        f"(requests[{i}]); expected prompt_tokens >= 1, output_tokens >= 1, "
                                        "arrival_step >= 0")
            for key, n in (("prompt_ids", r["prompt_tokens"]), ("output_ids", r["output_tokens"])):
                if r.get(key) is not None:
                    ff.int_list(r[key], path, w + key, n, lo=0)
            if r["id"] in seen:
                raise ff.InputFileError(f"{path}: field '{w}id' is {r['id']}, the id of requests[{seen[r['id']]}] "
                                        "too; expected unique request ids")
            seen[r["id"]] = i
            reqs.append(Request(**r))
        return cls(data["scenario"], data["description"], data["source"], data["tokenizer"], reqs, extra)


def check_workload_fits(wl: Workload, path: str, vocab_size: int, max_positions: Optional[int] = None,
                        need_ids: bool = True) -> None:
    """Check a loaded workload against the model that will run it: every request's token ids
    present (``need_ids``) and below ``vocab_size`` (a workload cut with another tokenizer is
    refused), and, given ``max_positions``, prompt + output - 1 positions within it. Raises
    :class:`~megatron_probe.fileformat.InputFileError` naming the file and the request."""
    for i, r in enumerate(wl.requests):
        for key in ("prompt_ids", "output_ids"):
            ids = getattr(r, key)
            if ids is None:
                if need_ids:
                    raise ff.InputFileError(f"{path}: requests[{i}] has no {key}; the model needs every request's "
                                            "token ids (rebuild the workload with tools/make_workloads.py)")
            elif ids and max(ids) >= vocab_size:
                raise ff.InputFileError(f"{path}: field 'requests[{i}].{key}' holds token id {max(ids)}, expected "
                                        f"ids below the model's vocab_size {vocab_size} (a workload of another "
                                        "tokenizer?)")
        if max_positions is not None and r.prompt_tokens + r.output_tokens - 1 > max_positions:
            raise ff.InputFileError(f"{path}: requests[{i}] needs {r.prompt_tokens + r.output_tokens - 1} positions "
                                    f"(prompt_tokens {r.prompt_tokens} + output_tokens {r.output_tokens} - 1), more "
                                    f"than the model's {max_positions}")


def _cut_request(tok, doc, gen, prompt_range, output_range, max_len):
    ids = tok.encode(doc.text).ids
    p = int(torch.randint(prompt_range[0], prompt_range[1] + 1, (), generator=gen))
    o = int(torch.randint(output_range[0], output_range[1] + 1, (), generator=gen))
    p, o = min(p, max_len - o), o
    if len(ids) < p + o + 1:
        return None
    start = int(torch.randint(0, len(ids) - p - o, (), generator=gen))
    return tok.decode(ids[start:start + p]), tok.decode(ids[start + p:start + p + o]), ids[start:start + p], \
        ids[start + p:start + p + o]


def build_workload(scenario: str, heldout: Dict[str, list], tok, seed: int = 0, num_requests: int = 160,
                   steps: int = 400, max_len: int = 256, prompt_range=(24, 128), output_range=(16, 96),
                   shift_step: int = 200, shift_from: str = "python", shift_to: str = "ja_ru",
                   tokenizer_name: str = "", split: str = "heldout") -> Workload:
    """Requests cut from the documents ``heldout[domain] = [Document]``: the held-out split for
    every evaluation workload; ``split='train'`` labels a workload cut from training documents
    (used only to warm-start the predictors, so evaluation stays on unseen text)."""
    if split not in ("heldout", "train"):
        raise ValueError(f"split={split!r}; valid: 'heldout', 'train'")
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; valid: {SCENARIOS}")
    if scenario in ("shift", "prefill", "onset"):
        for d in ((shift_to,) if scenario == "onset" else (shift_from, shift_to)):
            if d not in heldout:
                raise ValueError(f"domain {d!r} of the {scenario} scenario is not in the corpus; valid: {sorted(heldout)}")
    gen = torch.Generator().manual_seed(seed)
    domains = sorted(heldout)
    reqs: List[Request] = []

    def add(domain, arrival, fixed=None, ranges=None):
        pr, orr = ranges or (prompt_range, output_range)
        for _ in range(50):
            docs = heldout[domain]
            doc = docs[int(torch.randint(len(docs), (), generator=gen))]
            cut = fixed or _cut_request(tok, doc, gen, pr, orr, max_len)
            if cut is None:
                continue
            prompt, out, pids, oids = cut
            reqs.append(Request(len(reqs), int(arrival), domain, doc.path, len(pids), len(oids), prompt, out,
                                list(pids), list(oids)))
            return cut
        raise RuntimeError(f"no {split} document of domain {domain!r} is long enough for a request")

    arrivals = torch.linspace(0, steps * 0.75, num_requests).round().long().tolist()
    if scenario == "steady":
        for i, t in enumerate(arrivals):
            add(domains[i % len(domains)], t)
        desc = "mixed domains, one arrival every few steps"
    elif scenario == "shift":
        for t in arrivals:
            add(shift_from if t < shift_step else shift_to, t)
        desc = f"{shift_from} requests, then only {shift_to} requests from step {shift_step}"
    elif scenario == "repeat":
        protos = [add(domains[i % len(domains)], 0) for i in range(4)]
        reqs.clear()
        for i, t in enumerate(arrivals):
            p = protos[i % 4]
            add(domains[i % 4 % len(domains)], t, fixed=p)
        desc = "4 prompts, each duplicated many times (extreme skew)"
    elif scenario == "bursty":
        t, i = 0.0, 0
        rate_gap = steps * 0.75 / max(1, num_requests)
        while len(reqs) < num_requests:
            burst_domain = domains[int(torch.randint(len(domains), (), generator=gen))]
            size = int(torch.poisson(torch.tensor(8.0), generator=gen)) + 1
            for _ in range(min(size, num_requests - len(reqs))):
                add(burst_domain, round(t))
            t += rate_gap * size * float(torch.empty(()).exponential_(1.0, generator=gen))
            i += 1
        desc = "Poisson bursts, each burst from a single domain"
    elif scenario == "onset":
        if not 0 < shift_step < steps * 0.75:
            raise ValueError(f"onset: shift_step={shift_step} must lie inside the arrival window (0, {steps * 0.75:g})")
        light = max(1, num_requests // 12)
        for i, t in enumerate(torch.linspace(0, shift_step - 1, light).round().long().tolist()):
            add(domains[i % len(domains)], t)
        burst = length_ranges("prefill", max_len)
        for t in torch.linspace(shift_step, steps * 0.75, num_requests - light).round().long().tolist():
            dom = shift_to
            if float(torch.rand((), generator=gen)) >= PREFILL_DOMINANT_SHARE:
                dom = domains[int(torch.randint(len(domains), (), generator=gen))]
            add(dom, t, ranges=burst)
        desc = (f"onset: {light} mixed-domain requests over steps 0-{shift_step - 1}, then {num_requests - light} "
                f"long prompts ({PREFILL_DOMINANT_SHARE:.0%} {shift_to}) arriving from step {shift_step}")
    else:  # prefill
        # the arrival rate (num_requests over 3/4 of steps) sets how many prompts prefill at once
        half = num_requests // 2
        for i, t in enumerate(arrivals):
            dom = shift_from if i < half else shift_to
            if float(torch.rand((), generator=gen)) >= PREFILL_DOMINANT_SHARE:
                dom = domains[int(torch.randint(len(domains), (), generator=gen))]
            add(dom, t)
        shift_step = arrivals[half] if half < len(arrivals) else steps
        desc = (f"prefill-heavy: long prompts, short outputs, {num_requests} arrivals over {arrivals[-1] + 1} steps; "
                f"{PREFILL_DOMINANT_SHARE:.0%} {shift_from}, then {PREFILL_DOMINANT_SHARE:.0%} {shift_to} "
                f"from step {shift_step}")
    label = "held-out split" if split == "heldout" else "training split"
    return Workload(scenario, desc, f"{label} of megatron_probe.data.corpus", tokenizer_name, reqs,
                    {"seed": seed, "shift_step": shift_step if scenario in ("shift", "prefill", "onset") else None,
                     "split": split})


@dataclass
class StepWork:
    """What one engine step computes: for each request, a range of its token positions."""

    step: int
    chunks: List[tuple]  # (request_id, start, end) positions in prompt+output

    @property
    def num_tokens(self) -> int:
        return sum(e - s for _, s, e in self.chunks)


def schedule_steps(workload: Workload, prefill_chunk: int = 64, max_active: int = 32,
                   max_steps: Optional[int] = None) -> List[StepWork]:
    """Continuous batching: requests join at their arrival step (when fewer than ``max_active``
    are running), prefill in chunks of ``prefill_chunk`` tokens, then decode one token a step,
    and leave after their last output token. Deterministic (FIFO by arrival, then id)."""
    pending = sorted(workload.requests, key=lambda r: (r.arrival_step, r.id))
    active: Dict[int, list] = {}
    steps: List[StepWork] = []
    step = 0
    i = 0
    while (i < len(pending) or active) and (max_steps is None or step < max_steps):
        while i < len(pending) and pending[i].arrival_step <= step and len(active) < max_active:
            r = pending[i]
            # positions fed to the model: the prompt, then every output token but the last
            # (the last prefill chunk yields output token 1, each decode step the next)
            active[r.id] = [0, r.prompt_tokens, r.prompt_tokens + r.output_tokens - 1]
            i += 1
        chunks = []
        for rid, st in list(active.items()):
            done, prompt, total = st
            end = min(done + prefill_chunk, prompt) if done < prompt else done + 1
            chunks.append((rid, done, end))
            st[0] = end
            if end >= total:
                del active[rid]
        steps.append(StepWork(step, chunks))
        step += 1
    return steps
