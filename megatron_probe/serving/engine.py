"""Continuous-batching greedy inference for a Megatron-Core ``GPTModel``, on CPU and GPU.

Megatron-Core 0.16's dynamic engine (paged KV cache, continuous batching) is CUDA-only and its
static engine serves one fixed batch, so this engine builds the equivalent from Megatron parts
that run anywhere: every request owns a KV cache held in its own ``StaticInferenceContext``
(batch 1), and one engine step runs ONE ``GPTModel.forward`` over the packed tokens of every
active request (decode tokens plus chunked prefill), shaped ``[1, T]``. Each transformer
layer's self-attention is swapped for :class:`PackedSelfAttention`, which runs Megatron's own
attention once per request segment against that request's cache; everything else (embeddings,
layer norms, the MoE layers and their hooks, the output layer) sees the whole packed batch, so
the MoE layers see batches whose composition churns as in real serving.

Scheduling (deterministic, FIFO by arrival step then id; the same rule as
:func:`megatron_probe.data.workloads.schedule_steps`): a request joins at its arrival step when
a KV slot is free (otherwise it queues; nothing is dropped), feeds its prompt in chunks of
``prefill_chunk`` tokens, then one token a step, and leaves after ``max_new_tokens`` tokens or
the end-of-text token. Under expert parallelism each rank serves its own requests (attention is
data-parallel across EP ranks, as in Megatron) and all ranks step in lockstep, since every MoE
layer is a collective; a rank with nothing to do still joins with zero tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_probe.mechanism import stages
from megatron_probe.mechanism.comm import all_gather_rows
from megatron_probe.mechanism.profiling import nvtx_pop, nvtx_push, nvtx_range


@dataclass
class ServeRequest:
    """One request and its serving state. Times are on the owning engine's clock (seconds of
    its own step time: with two engines alternating, each counts only its own steps)."""

    id: int
    prompt_ids: List[int]
    max_new_tokens: int
    arrival_step: int = 0
    generated: List[int] = field(default_factory=list)
    fed: int = 0  # positions already in the KV cache
    slot: Optional[int] = None
    t_arrival: Optional[float] = None
    t_first: Optional[float] = None
    t_finish: Optional[float] = None
    finished: bool = False

    @property
    def positions_needed(self) -> int:
        # the last generated token is never fed back
        return len(self.prompt_ids) + self.max_new_tokens - 1

    @property
    def ttft_s(self) -> Optional[float]:
        return None if self.t_first is None else self.t_first - self.t_arrival

    @property
    def tpot_s(self) -> Optional[float]:
        if self.t_finish is None or len(self.generated) < 2:
            return None
        return (self.t_finish - self.t_first) / (len(self.generated) - 1)


@dataclass
class Segment:
    request: ServeRequest
    start: int  # offset of the segment in the packed batch
    length: int
    context: object  # the request's StaticInferenceContext
    mask: torch.Tensor  # [1, 1, length, cached + length], True = masked


@dataclass
class StepRecord:
    step: int
    tokens: int  # this rank's tokens in the step
    prefill_tokens: int
    decode_tokens: int
    active: int
    queued: int
    seconds: float
    emitted: int  # new tokens produced on this rank


@dataclass
class StageLinks:
    """This rank's place in a pipeline of stages (Megatron's PP): the packed hidden states come
    from global rank ``prev`` and go to ``next`` (None at the ends); the last stage samples, and
    its tokens reach every stage of the pipeline by a broadcast on ``group`` from ``last``."""

    group: object
    prev: Optional[int]
    next: Optional[int]
    last: int


class PackedSelfAttention(torch.nn.Module):
    """Megatron's self-attention run per request segment of a packed ``[T, 1, h]`` batch, each
    segment against its own KV cache. The mask and context the layer passes in are ignored:
    the engine sets the segments before each forward."""

    def __init__(self, inner: torch.nn.Module, engine: "ContinuousBatchingEngine"):
        super().__init__()
        self.inner = inner
        self._engine = [engine]  # a list: not registered as a submodule

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        engine = self._engine[0]
        segments = engine.segments
        if not segments:
            return torch.zeros_like(hidden_states), None
        if engine.sequence_parallel:  # this rank's share of the sequence: attention needs all of it
            hidden_states = _gather_sequence(hidden_states, engine.tp_group)
        outs, bias = [], None
        for seg in segments:
            h = hidden_states[seg.start:seg.start + seg.length]
            out, bias = self.inner(h, seg.mask, inference_context=seg.context)
            outs.append(out)
        out = torch.cat(outs, 0)
        if engine.sequence_parallel:  # back to this rank's share (the padding rows: zero)
            pad = hidden_states.shape[0] - out.shape[0]
            if pad:
                out = torch.cat([out, out.new_zeros(pad, *out.shape[1:])], 0)
            share = out.shape[0] // engine.tp_size
            out = out[engine.tp_rank * share:(engine.tp_rank + 1) * share]
        return out, bias


def _gather_sequence(shard: torch.Tensor, group) -> torch.Tensor:
    """The TP group's sequence shards ``[T / tp, ...]`` -> the whole ``[T, ...]``, in rank order."""
    out = shard.new_empty(shard.shape[0] * dist.get_world_size(group), *shard.shape[1:])
    dist.all_gather_into_tensor(out, shard.contiguous(), group=group)
    return out


class KVSlots:
    """``capacity`` per-request KV caches, allocated once (Megatron would allocate them on CUDA
    on first use; pre-filling ``key_value_memory_dict`` keeps them on the model's device)."""

    def __init__(self, model, capacity: int, max_seq_len: int, dtype, device):
        from megatron.core.inference.contexts import StaticInferenceContext

        self.capacity = capacity
        self.contexts = []
        for _ in range(capacity):
            ctx = StaticInferenceContext(max_batch_size=1, max_sequence_length=max_seq_len)
            for layer in model.decoder.layers:
                att = _attention(layer)
                shape = (max_seq_len, 1, att.num_query_groups_per_partition, att.hidden_size_per_attention_head)
                ctx.key_value_memory_dict[att.layer_number] = (torch.zeros(shape, dtype=dtype, device=device),
                                                               torch.zeros(shape, dtype=dtype, device=device))
            self.contexts.append(ctx)
        self.free = list(range(capacity))

    def take(self) -> int:
        slot = self.free.pop(0)
        self.contexts[slot].sequence_len_offset = 0
        return slot

    def give_back(self, slot: int) -> None:
        self.free.append(slot)
        self.free.sort()

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for c in self.contexts for kv in c.key_value_memory_dict.values()
                   for t in kv)


def _attention(layer):
    att = layer.self_attention
    return att.inner if isinstance(att, PackedSelfAttention) else att


class ContinuousBatchingEngine:
    """Greedy continuous batching over this rank's ``requests``; see the module docstring.

    ``group``: the process group whose ranks step together (the EP group; ``None`` on one
    process). ``kv_capacity``: KV slots, i.e. the most requests decoding at once on this rank.
    ``tp_group``: Megatron's tensor-parallel group when TP > 1 (the logits are vocab-parallel:
    gathered here, on the model's device; Megatron's own gather allocates on CUDA). With the
    model's ``config.sequence_parallel`` the TP peers, which serve the same requests, each hold
    a share of the packed sequence outside attention (the MoE layers dispatch only their
    share): the packed batch is padded to a multiple of TP with at most TP - 1 tokens (position
    0, never sampled, routed like any token), and :class:`PackedSelfAttention` gathers the
    sequence, runs each request's attention with Megatron's sequence-parallel linears switched
    to plain TP, and keeps its share of the result. ``stages``:
    this rank's :class:`StageLinks` under pipeline parallelism (every stage of a pipeline runs
    the same schedule on the same requests; only the layers differ).
    """

    def __init__(self, model, requests: Sequence[ServeRequest], max_seq_len: int, kv_capacity: int = 32,
                 prefill_chunk: int = 64, eos_id: Optional[int] = None, group=None, name: str = "engine",
                 tp_group=None, stages: Optional[StageLinks] = None):
        if kv_capacity < 1:
            raise ValueError(f"kv_capacity={kv_capacity}: must be >= 1")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk={prefill_chunk}: must be >= 1")
        for r in requests:
            if not r.prompt_ids:
                raise ValueError(f"request {r.id} has an empty prompt")
            if r.max_new_tokens < 1:
                raise ValueError(f"request {r.id}: max_new_tokens={r.max_new_tokens} must be >= 1")
            if r.positions_needed > max_seq_len:
                raise ValueError(f"request {r.id} needs {r.positions_needed} positions ({len(r.prompt_ids)} prompt + "
                                 f"{r.max_new_tokens} new - 1) but the model's maximum sequence length is {max_seq_len}")
        self.model, self.name = model, name
        self.max_seq_len, self.prefill_chunk, self.eos_id, self.group = max_seq_len, prefill_chunk, eos_id, group
        self.tp_group, self.stages = tp_group, stages
        self.sequence_parallel = bool(getattr(model.config, "sequence_parallel", False))
        self.tp_size = 1 if tp_group is None else dist.get_world_size(tp_group)
        self.tp_rank = 0 if tp_group is None else dist.get_rank(tp_group)
        if self.sequence_parallel and self.tp_size < 2:
            raise ValueError(f"the model is sequence parallel but the engine's TP group has {self.tp_size} rank(s): "
                             "pass tp_group (Megatron's tensor-parallel group, size > 1)")
        self.pad_id = 0 if eos_id is None else eos_id
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.slots = KVSlots(model, kv_capacity, max_seq_len, param.dtype, param.device)
        self.queue: List[ServeRequest] = sorted(requests, key=lambda r: (r.arrival_step, r.id))
        self.requests = {r.id: r for r in requests}
        self.active: List[ServeRequest] = []
        self.segments: List[Segment] = []
        self.step_index = 0
        self.clock = 0.0
        self.records: List[StepRecord] = []
        self._distributed = group is not None or (dist.is_initialized() and dist.get_world_size() > 1)

    # ------------------------------------------------------------------ scheduling
    def _admit(self) -> None:
        for r in self.queue:
            if r.arrival_step <= self.step_index and r.t_arrival is None:
                r.t_arrival = self.clock
        while self.queue and self.queue[0].arrival_step <= self.step_index and self.slots.free:
            r = self.queue.pop(0)
            r.slot = self.slots.take()
            self.active.append(r)

    def _plan(self):
        """This step's segments and the packed input ids / positions."""
        ids, pos, self.segments = [], [], []
        for r in self.active:
            if r.fed < len(r.prompt_ids):
                n = min(self.prefill_chunk, len(r.prompt_ids) - r.fed)
                chunk = r.prompt_ids[r.fed:r.fed + n]
            else:
                n, chunk = 1, [r.generated[-1]]
            cached = r.fed
            mask = torch.ones(n, cached + n, dtype=torch.bool, device=self.device).triu_(cached + 1)
            self.segments.append(Segment(r, len(ids), n, self.slots.contexts[r.slot], mask.view(1, 1, n, cached + n)))
            ids += chunk
            pos += range(cached, cached + n)
        return ids, pos

    def done(self) -> bool:
        return not self.queue and not self.active

    def _global(self, tokens: int) -> tuple:
        """(tokens this step, requests not yet finished), summed over the group's ranks."""
        t = torch.tensor([tokens, len(self.queue) + len(self.active)], dtype=torch.long)
        if self._distributed:
            if t.device != self.device and dist.get_backend(self.group) == "nccl":
                t = t.to(self.device)
            dist.all_reduce(t, group=self.group)
        return int(t[0]), int(t[1])

    # ------------------------------------------------------------------ one step
    @torch.inference_mode()
    def step(self, before_forward=None, after_forward=None) -> Optional[StepRecord]:
        """Admit, run one forward over every active request's tokens, sample greedily, retire.
        Returns None once every rank is done (a collective: call it on every rank).
        ``after_forward`` (e.g. the pipeline's ``end_step``) runs inside the step's timed region:
        whatever the serving stack does for a step is counted in its time."""
        self._admit()
        ids, pos = self._plan()
        total, remaining = self._global(len(ids))
        if remaining == 0:
            return None
        prefill = sum(s.length for s in self.segments if s.request.fed < len(s.request.prompt_ids))
        t0 = time.perf_counter()
        emitted = 0
        if total:  # an idle step (no rank has tokens: waiting for arrivals) runs no forward
            if before_forward is not None:
                before_forward()
            with nvtx_range(f"{self.name}.step"), _packed_attention(self.model, self):
                pad = (-len(ids)) % self.tp_size if self.sequence_parallel else 0
                tokens = torch.tensor([ids + [self.pad_id] * pad], dtype=torch.long, device=self.device)
                positions = torch.tensor([pos + [0] * pad], dtype=torch.long, device=self.device)
                # this rank's rows of the hidden states: all T, or its share under sequence parallel
                rows = (len(ids) + pad) // (self.tp_size if self.sequence_parallel else 1)
                links = self.stages
                # the stages of a pipeline serve the same requests: the same T on each (0: nothing moves)
                if links is not None and links.prev is not None:  # a later stage: the previous one's output
                    h = torch.empty(rows, 1, self.model.config.hidden_size, dtype=self.dtype, device=self.device)
                    if ids:
                        dist.recv(h, links.prev)
                    self.model.set_input_tensor(h)
                out = self.model(tokens, positions, None)  # logits [1, T, V] (V / TP: this rank's share)
                if links is not None and links.next is not None and ids:  # hidden states [T, 1, H] onwards
                    dist.send(out.contiguous(), links.next)
            nxt = self._sample(out)
        if after_forward is not None:
            after_forward()
        if total and self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        self.clock += dt
        if total:
            for seg, tok in zip(self.segments, nxt):
                r = seg.request
                seg.context.sequence_len_offset += seg.length
                r.fed += seg.length
                if r.fed < len(r.prompt_ids):
                    continue  # mid-prefill: the logits of a partial prompt are not sampled
                r.generated.append(int(tok))
                emitted += 1
                if r.t_first is None:
                    r.t_first = self.clock
                if len(r.generated) >= r.max_new_tokens or (self.eos_id is not None and tok == self.eos_id):
                    r.finished, r.t_finish = True, self.clock
                    self.slots.give_back(r.slot)
                    r.slot = None
            self.active = [r for r in self.active if not r.finished]
        rec = StepRecord(self.step_index, len(ids), prefill, len(ids) - prefill, len(self.segments), len(self.queue),
                         dt, emitted)
        self.records.append(rec)
        self.segments = []
        self.step_index += 1
        return rec

    def _sample(self, out) -> List[int]:
        """The next token of every segment: greedy on the last stage's logits (the whole
        vocabulary gathered under TP), broadcast to the other stages of the pipeline."""
        if not self.segments:  # the same on every stage and TP peer: they serve the same requests
            return []
        last_stage = self.stages is None or self.stages.next is None
        if last_stage:
            ends = torch.tensor([s.start + s.length - 1 for s in self.segments], dtype=torch.long, device=self.device)
            last = out[0, ends]
            if self.tp_group is not None:  # the whole vocabulary, for the last positions only
                last = torch.cat(list(all_gather_rows(last.contiguous(), self.tp_group)), dim=-1)
            nxt = last.argmax(-1)
        else:
            nxt = torch.empty(len(self.segments), dtype=torch.long, device=self.device)
        if self.stages is not None:
            dist.broadcast(nxt, src=self.stages.last, group=self.stages.group)
        return nxt.tolist()

    def run(self, max_steps: Optional[int] = None) -> List[StepRecord]:
        while max_steps is None or self.step_index < max_steps:
            if self.step() is None:
                break
        return self.records

    def outputs(self) -> Dict[int, List[int]]:
        return {rid: list(r.generated) for rid, r in self.requests.items()}


class _packed_attention:
    """For one forward: swap every self-attention of the model for :class:`PackedSelfAttention`
    and bracket every transformer layer with an NVTX range ``layer<i>`` (both undone after, so
    the model is unchanged outside the engine's steps)."""

    def __init__(self, model, engine):
        self.layers, self.engine = list(model.decoder.layers), engine
        self.handles = []

    def __enter__(self):
        self.depth = stages.depth()
        for i, layer in enumerate(self.layers):
            if self.engine.sequence_parallel:  # attention runs on the gathered sequence: plain TP linears
                for linear in (layer.self_attention.linear_qkv, layer.self_attention.linear_proj):
                    linear.sequence_parallel = False
            layer.self_attention = PackedSelfAttention(layer.self_attention, self.engine)
            self.handles.append(layer.register_forward_pre_hook(lambda m, a, i=i: nvtx_push(f"layer{i}")))
            self.handles.append(layer.register_forward_hook(lambda m, a, o: nvtx_pop()))

    def __exit__(self, exc_type, exc, tb):
        if exc is not None:
            stages.stamp(exc)  # with the layer it was raised in
        stages.truncate(self.depth)  # a layer that raised never popped its range
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for layer in self.layers:
            layer.self_attention = layer.self_attention.inner
            if self.engine.sequence_parallel:
                for linear in (layer.self_attention.linear_qkv, layer.self_attention.linear_proj):
                    linear.sequence_parallel = True


def requests_from_workload(workload, rank: int = 0, world: int = 1, max_requests: Optional[int] = None,
                           max_new_tokens: Optional[int] = None) -> List[ServeRequest]:
    """This rank's share (request id mod ``world``) of a workload's requests: the prompt ids and
    the reference output's length as the generation budget."""
    out = []
    for r in sorted(workload.requests, key=lambda r: r.id):
        if max_requests is not None and r.id >= max_requests:
            continue
        if r.prompt_ids is None:
            raise ValueError(f"workload request {r.id} has no prompt_ids (rebuild it with tools/make_workloads.py)")
        if r.id % world == rank:
            n = r.output_tokens if max_new_tokens is None else min(max_new_tokens, r.output_tokens)
            out.append(ServeRequest(r.id, list(r.prompt_ids), n, r.arrival_step))
    return out
