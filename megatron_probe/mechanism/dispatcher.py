"""``ProbeTokenDispatcher``: Megatron's token-dispatcher interface over replicated experts.

Dropless. Each rank computes ``S = L + R`` expert slots (its ``L`` native experts, then ``R``
replica slots). A token routed to expert ``e`` may be computed on any rank holding a copy of
``e``; the *assignment* says how many of each source rank's tokens of ``e`` go to each copy.
Dispatch always follows the true router output; placement and assignment only decide *where*
each (token, expert) pair is computed, never *whether*, so the layer output cannot change.

Order of operations (the ``alltoall`` dispatcher's, plus the slot mapping):
1. ``dispatch_preprocess``: all-gather per-expert counts ``[ep, E]``; choose or check the
   assignment; order the pairs expert-major as Megatron's ``permute`` does (so the combine sums
   each token's top-k outputs in the stock order), then by destination slot. The per-pair work
   runs on the tokens' device; the host sees only ``[ep, E]``-sized tables. At EP 1 with nothing
   attached, nothing at all is read back to the host (a CUDA graph can capture the layer).
2. ``token_dispatch``: one uneven all-to-all for tokens and one for probs.
3. ``dispatch_postprocess``: chunks arrive ``[src][slot]``; sort them ``[slot][src]`` and hand
   the experts ``tokens_per_expert`` of length ``S``.
4-6. the exact inverse.

With no replica in the placement this moves the same rows to the same ranks as Megatron's
``alltoall`` dispatcher.

Expert tensor parallelism (ETP = TP over the same ranks, inference only): every rank holds a
shard of each of its experts' weights (fc1 by output rows, fc2 by input columns), so an expert's
output is the sum of its shards' outputs over the ETP group. The ETP peers hold the same tokens
(without sequence parallel) or their shares of one sequence (with it: the dispatcher first
gathers the peers' tokens, routing and probs). Each ETP rank then dispatches that same token
set on its own EP group, whose ranks hold the same shard index, so counts, assignment and the
whole dispatch are as without ETP; after the combine the partial outputs are summed over the
ETP group and, under sequence parallel, each rank keeps its own tokens' rows. Megatron's
``alltoall`` dispatcher gathers over ETP after its All-to-All instead; under sequence parallel
this order moves ETP times the tokens through the All-to-All (without it both move every token
ETP times), and in return the EP groups of different shard indices need no agreement for
correctness (the pipeline still forecasts alike on all of them: ``carry``).

Who decides where a token goes (nothing else reaches into the dispatcher):

* the **placement** ``[ep, R]``: :meth:`ProbeTokenDispatcher.set_placement`, called by
  ``ProbeMoELayer.set_replica_placement`` (after the layer's own fill) or by the live pipeline
  right before each dispatch (:class:`DispatchHooks.before_dispatch`);
* the **assignment** ``[ep, E, ep]``, first match wins: a one-off tensor
  (:meth:`set_next_assignment`), an :class:`AssignmentFn` installed as ``assignment_fn`` (the
  pipeline installs re-assignment on the true counts), or the configured default policy
  (``ProbeConfig.assignment_policy``). Every source is checked against the true counts.
* :class:`DispatchHooks` installed as ``hooks`` (the pipeline, ``runtime/pipeline.py``) are
  called at fixed points: before the count exchange, around both All-to-Alls (a context manager:
  the pipeline pauses its weight copies inside it), before the experts, after the combine.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Optional, Protocol

import torch

from megatron.core.transformer.moe.moe_utils import sort_chunks_by_idxs, unpermute
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher

from megatron_probe.config import ProbeConfig
from megatron_probe.mechanism.comm import (
    all_gather_rows,
    all_gather_varying_rows,
    all_reduce_sum,
    all_to_all,
    device_to_host,
    host_to_device,
)
from megatron_probe.mechanism.profiling import nvtx_range
from megatron_probe.policy.placement import (
    ExpertLayout,
    assignment_from_placement,
    check_assignment_async,
    empty_placement,
    holder_slots,
    slot_experts,
    validate_assignment,
    validate_placement,
)


def _pair_entries(routing_map: torch.Tensor, num_pairs: int) -> torch.Tensor:
    """Each routed (token, expert) pair as an index into the ``[E, tokens]`` routing map, in
    Megatron's ``permute`` order (expert-major, token-minor), ``num_pairs`` of them. Each pair's
    position comes from a cumulative sum, not from ``masked_select`` (whose size a GPU reads
    back to the host); entries not selected all land in one spare position, dropped after."""
    flat = routing_map.T.reshape(-1)
    position = torch.where(flat, flat.long().cumsum(0) - 1, num_pairs)
    entry = torch.empty(num_pairs + 1, dtype=torch.long, device=flat.device)
    entry.scatter_(0, position, torch.arange(flat.numel(), device=flat.device))
    return entry[:num_pairs]


class AssignmentFn(Protocol):
    """Chooses the token split of a dispatch from the true counts ``[ep, E]`` (the same on every
    rank), the placement ``[ep, R]`` and the layout; returns ``[ep_src, E, ep_dst]``."""

    def __call__(self, counts: torch.Tensor, placement: torch.Tensor, layout: ExpertLayout) -> torch.Tensor: ...


class DispatchHooks(Protocol):
    """What drives a dispatcher from outside, called on every rank at the same points."""

    def before_dispatch(self, dispatcher: "ProbeTokenDispatcher") -> None:
        """Before the count exchange: the last moment to set the placement and assignment_fn."""

    def all_to_all(self, dispatcher: "ProbeTokenDispatcher", kind: str) -> ContextManager[None]:
        """Brackets the dispatch (``kind="dispatch"``) and combine (``"combine"``) All-to-All, and
        under expert TP the peers' gather (``"etp_gather"``) and sum (``"etp_reduce"``)."""

    def before_experts(self, dispatcher: "ProbeTokenDispatcher") -> None:
        """Tokens have arrived; the experts are about to run."""

    def after_combine(self, dispatcher: "ProbeTokenDispatcher") -> None:
        """Outputs are back at their source ranks (``last_counts`` / ``last_assignment`` hold
        what this dispatch used)."""


class ProbeTokenDispatcher(MoETokenDispatcher):
    def __init__(self, num_local_experts, local_expert_indices, config, pg_collection,
                 probe_config: Optional[ProbeConfig] = None):
        super().__init__(config=config, pg_collection=pg_collection)
        # expert TP (self.tp_size, Megatron's expert-TP group): only over the attention-TP ranks,
        # whose tokens are known to be the same (or one sequence's shares, under SP)
        self.etp_gathers_tokens = False
        if self.tp_size != 1:
            attn_tp = getattr(pg_collection, "tp", None)
            etp_ranks = torch.distributed.get_process_group_ranks(self.tp_group)
            tp_ranks = torch.distributed.get_process_group_ranks(attn_tp) if attn_tp is not None else None
            if tp_ranks != etp_ranks:
                raise NotImplementedError(
                    f"expert tensor parallel size {self.tp_size} over ranks {etp_ranks}: the PROBE dispatcher "
                    f"takes expert TP equal to TP over the same ranks (the TP group is {tp_ranks}); valid: "
                    "expert_tensor_parallel_size 1 or tensor_model_parallel_size")
            self.etp_gathers_tokens = bool(config.sequence_parallel)
        self.probe_config = probe_config or ProbeConfig()
        # "device": counts and assignment stay where the tokens are (the live pipeline sets its own)
        self.control_path = self.probe_config.control_path
        self.num_experts = config.num_moe_experts
        self.num_local_experts = num_local_experts
        self.local_expert_indices = list(local_expert_indices)
        self.layout = ExpertLayout(self.num_experts, self.ep_size, self.probe_config.replica_slots_per_rank)
        if num_local_experts != self.layout.num_local_experts:
            raise ValueError(f"num_local_experts={num_local_experts} != {self.layout.num_local_experts}")
        self.ep_rank = torch.distributed.get_rank(self.ep_group) if self.ep_size > 1 else 0
        self.placement = empty_placement(self.layout)
        self._refresh_tables()
        self._pending_assignment: Optional[torch.Tensor] = None
        self.assignment_fn: Optional[AssignmentFn] = None
        # chunk orders: received [src][slot] -> experts want [slot][src], and back; for the S
        # slots, and for the L native slots alone (a dispatch with no replica anywhere uses only
        # those: exactly the stock layer's layout and work)
        self._sort_orders = {n: (torch.arange(self.ep_size * n).view(self.ep_size, n).T.ravel(),
                                 torch.arange(self.ep_size * n).view(n, self.ep_size).T.ravel())
                             for n in {self.layout.slots_per_rank, num_local_experts}}
        self.slots_in_use = self.layout.slots_per_rank  # of the current dispatch: S, or L with no replica
        self.last_counts: Optional[torch.Tensor] = None
        self.last_assignment: Optional[torch.Tensor] = None
        self.dispatches = 0  # count exchanges so far (tells a reader whether last_counts is new)
        # installed by the live pipeline (None: a plain PROBE dispatcher), and this layer's index
        # among the model's MoE layers, which the hooks use to tell layers apart
        self.hooks: Optional[DispatchHooks] = None
        self.layer_index: Optional[int] = None
        # counts someone else needs from every rank, carried by this dispatch's own count
        # exchange (one [ep, E + n] all-gather instead of two): set before the dispatch on every
        # rank alike, read back as ``last_extra`` [ep, n] after it
        self.extra_counts: Optional[torch.Tensor] = None
        self.last_extra: Optional[torch.Tensor] = None
        self.counts_ready = None  # device control on a GPU: the event after the last count exchange
        self._extra_max_columns: list = []  # carried columns combined over expert TP by max, not sum

    # ------------------------------------------------------------------ plan inputs
    def set_placement(self, placement: torch.Tensor) -> None:
        placement = placement.detach().cpu().long()
        if torch.equal(placement, self.placement):
            return  # unchanged (the common case between steps): keep the derived tables
        validate_placement(placement, self.layout)
        self.placement = placement.clone()
        self._refresh_tables()

    def _refresh_tables(self) -> None:
        """Lookup tables derived from the placement: slot of each expert on each rank, and the
        expert held by each of this rank's slots."""
        self._holder_slots = holder_slots(self.placement, self.layout)
        self._holder_slots_on = None  # its copy where the tokens are (_device_table)
        self._slot_experts_on = None  # this rank's slot experts there (_device_slot_experts)
        self._my_slot_experts = slot_experts(self.placement, self.layout)[self.ep_rank]
        self._replicated = bool((self.placement >= 0).any())

    def carry(self, values: torch.Tensor, over_expert_tp: str = "sum") -> slice:
        """Add ``values`` (integers, ``[n]``, the same length on every rank) to what the next
        dispatch's count exchange carries; returns the columns of ``last_extra`` that will hold
        every rank's values. Several callers may carry on the same dispatch. When the dispatch
        gathers its expert-TP peers' tokens (expert TP with sequence parallel), each rank's row
        stands for the peers' tokens too: ``over_expert_tp`` says how the peers' values combine
        (``"sum"``: counts of their tokens; ``"max"``, also under expert TP without sequence
        parallel, so every shard index sees the same value)."""
        if over_expert_tp not in ("sum", "max"):
            raise ValueError(f"over_expert_tp={over_expert_tp!r}; valid: 'sum', 'max'")
        v = values.reshape(-1).long()
        start = 0 if self.extra_counts is None else self.extra_counts.numel()
        self.extra_counts = v if self.extra_counts is None else torch.cat([self.extra_counts.long(),
                                                                           v.to(self.extra_counts.device)])
        if over_expert_tp == "max":
            self._extra_max_columns.extend(range(start, start + v.numel()))
        return slice(start, start + v.numel())

    def set_next_assignment(self, assignment: Optional[torch.Tensor]) -> None:
        """Use this ``[ep, E, ep]`` assignment for the next dispatch only (checked against the
        true counts then). Every rank must pass the same tensor."""
        self._pending_assignment = None if assignment is None else assignment.detach().cpu().long()

    # ------------------------------------------------------------------ dispatch
    def dispatch_preprocess(self, hidden_states, routing_map, probs):
        if self.hooks is not None:
            self.hooks.before_dispatch(self)
        self.hidden_shape = hidden_states.shape
        hidden = hidden_states.reshape(-1, self.hidden_shape[-1])
        if self.tp_size > 1 and torch.is_grad_enabled() and (hidden.requires_grad or probs.requires_grad):
            raise NotImplementedError("expert tensor parallel in the PROBE dispatcher is for inference: run "
                                      "under torch.no_grad()/inference_mode(), or use expert TP 1")
        if self.etp_gathers_tokens:  # the ETP peers' shares of the sequence: every peer computes all of them
            own = hidden.shape[0]
            with self._all_to_all_bracket("etp_gather"), nvtx_range("etp_gather"):
                hidden, sizes = all_gather_varying_rows(hidden, self.tp_group)
                # the same rows: their counts are known (one gather each instead of two)
                routing_map = all_gather_varying_rows(routing_map.to(torch.uint8), self.tp_group, sizes)[0].bool()
                probs = all_gather_varying_rows(probs, self.tp_group, sizes)[0]
            start = sum(sizes[:torch.distributed.get_rank(self.tp_group)])
            self._own_rows = slice(start, start + own)
        self.hidden_shape_before_permute = hidden.shape
        self.routing_map = routing_map
        E, S, ep = self.num_experts, self.layout.slots_per_rank, self.ep_size
        if routing_map.shape != (hidden.shape[0], E):
            raise ValueError(f"routing_map {tuple(routing_map.shape)} != ({hidden.shape[0]}, {E})")

        if self._stays_on_device():
            return self._preprocess_on_device(hidden, routing_map, probs)

        local_counts = routing_map.sum(dim=0).long()
        extra, self.extra_counts = self.extra_counts, None
        max_columns, self._extra_max_columns = self._extra_max_columns, []
        if extra is not None and self.tp_size > 1 and (self.etp_gathers_tokens or max_columns):
            # the expert-TP peers' carried values: with their tokens gathered, counts add up; the
            # max columns combine either way (without SP the peers' counts are equal already)
            extra = extra.to(local_counts.device)
            peers = all_gather_rows(extra, self.tp_group)  # [etp, n]
            if self.etp_gathers_tokens:
                extra = peers.sum(0)
            if max_columns:
                extra[max_columns] = peers[:, max_columns].max(0).values
        # device-resident control: the counts, the assignment and everything derived from them
        # stay where the tokens are; only the All-to-All's split sizes come back (below)
        on_device = self._control_on_device()
        with nvtx_range("counts"):
            if extra is None:
                counts = all_gather_rows(local_counts, self.ep_group)  # [ep, E]
                self.last_extra = None
            else:  # the piggybacked counts (e.g. the next layer's forecast) travel in the same gather
                both = all_gather_rows(torch.cat([local_counts, extra.to(local_counts)]), self.ep_group)
                counts, self.last_extra = both[:, :E].contiguous(), both[:, E:].contiguous()
            if not on_device:
                counts = counts.cpu()
                self.last_extra = None if self.last_extra is None else self.last_extra.cpu()
            # on a GPU, where the exchange ends on the stream: work on another stream that reads
            # the counts or the carried forecasts waits for this alone
            self.counts_ready = None
            if on_device and counts.device.type == "cuda":
                self.counts_ready = torch.cuda.Event()
                self.counts_ready.record()
        me = self.ep_rank
        assign = self._choose_assignment(counts, on_device)  # [ep, E, ep], CPU unless on_device
        self.last_counts, self.last_assignment = counts, assign
        self.dispatches += 1
        # no replica anywhere (the assignment then sends every token home): the native slots only
        S = S if self._replicated else self.layout.num_local_experts
        self.slots_in_use = S

        # the pairs expert-major, token-minor (Megatron's permute order), built where the tokens
        # are: the host handles only [ep, E]-sized tables, never a per-pair array
        num_pairs = self._dropless_pairs(routing_map) if on_device else int(counts[me].sum())
        device = hidden.device
        pair_entry = _pair_entries(routing_map, num_pairs)
        self.reversed_mapping = pair_entry % routing_map.shape[0]
        mine = assign[me]  # [E, ep]
        if self._replicated:
            # destination slot of every pair: pairs [bounds[d-1], bounds[d]) of an expert go to d
            pair_expert = pair_entry // routing_map.shape[0]
            first_pair = torch.cumsum(local_counts, 0) - local_counts  # this rank's counts, on its device
            rank_in_expert = torch.arange(num_pairs, device=device) - first_pair[pair_expert]
            bounds = host_to_device(torch.cumsum(mine, dim=1), device)  # [E, ep]
            pair_dst = torch.searchsorted(bounds[pair_expert], rank_in_expert.unsqueeze(1), right=True).squeeze(1)
            pair_slot = self._device_table(device)[pair_dst, pair_expert]
            self.send_order = torch.sort(pair_dst * S + pair_slot, stable=True).indices
            sent = pair_entry.index_select(0, self.send_order)
        else:  # every pair goes home, and expert order is home-slot order: nothing to reorder
            self.send_order, sent = None, pair_entry
        # what each source sends to each of my slots, derived from the shared assignment
        held = self._device_slot_experts(assign.device)[:S] if on_device else self._my_slot_experts[:S]  # [S]
        valid = held >= 0
        recv = assign[:, held.clamp_min(0), me] * valid  # [src, slot]; an empty slot receives nothing
        if on_device:  # the one read-back of the dispatch: the sizes the All-to-All takes on the host
            sizes = device_to_host(torch.cat([mine.sum(0), recv.reshape(-1)]))
            self.input_splits, recv = sizes[:ep].tolist(), sizes[ep:].view(ep, S)
        else:
            self.input_splits = mine.sum(0).tolist()  # [ep]: pairs to each rank
        self.recv_counts = recv  # [src, slot], host
        self.output_splits = recv.sum(1).tolist()
        self.tokens_per_slot = recv.sum(0)
        rows = self.reversed_mapping if self.send_order is None else sent % routing_map.shape[0]
        return hidden.index_select(0, rows), probs.T.reshape(-1).index_select(0, sent)

    def _device_table(self, device) -> torch.Tensor:
        """The slot of each expert on each rank (``[ep, E]``, -1 where none), on ``device``,
        copied once per placement."""
        if self._holder_slots_on is None or self._holder_slots_on.device != device:
            self._holder_slots_on = host_to_device(self._holder_slots, device)
        return self._holder_slots_on

    def _device_slot_experts(self, device) -> torch.Tensor:
        """The expert held by each of this rank's slots (``[S]``, -1 where empty), on ``device``,
        copied once per placement."""
        if self._slot_experts_on is None or self._slot_experts_on.device != device:
            self._slot_experts_on = host_to_device(self._my_slot_experts, device)
        return self._slot_experts_on

    def _control_on_device(self) -> bool:
        """Whether this dispatch keeps its counts and assignment on the tokens' device
        (``ProbeConfig.control_path="device"``): with an assignment source that works there (the
        live pipeline's device split) or no replica at all. A pending host assignment, or replicas
        with the default host policy, take the host path."""
        return (self.control_path == "device" and self._pending_assignment is None
                and (self.assignment_fn is not None or not self._replicated))

    def _dropless_pairs(self, routing_map: torch.Tensor) -> int:
        """This rank's (token, expert) pairs without reading its counts back: tokens x top-k,
        Megatron's dropless count (a router must select exactly top-k experts per token; checked
        here, on the device as an asynchronous assertion)."""
        tokens = routing_map.shape[0]
        topk = self.config.moe_router_topk
        per_token = routing_map.sum(dim=1)
        if per_token.device.type == "cpu":  # free to check here; on a device a read would synchronise
            bad = (per_token != topk).nonzero()
            if bad.numel():
                t = int(bad[0, 0])
                raise ValueError(f"routing_map row {t} selects {int(per_token[t])} experts; the dropless dispatch "
                                 f"takes exactly moe_router_topk={topk} per token")
        else:
            torch._assert_async((per_token == topk).all(), "routing_map rows must select moe_router_topk experts")
        return tokens * topk

    def _stays_on_device(self) -> bool:
        """Whether this dispatch can run without reading anything back to the host (so a CUDA
        graph can capture it): one EP rank and no expert TP (no count exchange, no split sizes,
        every token computed at home) and nobody who needs the counts on the host (no hooks, no
        assignment source, no carried counts). The pairs are sized as tokens x top-k, Megatron's
        dropless count: its own alltoall dispatcher sizes them so too (a router must select
        exactly top-k experts per token; ``_preprocess_on_device`` checks it)."""
        return (self.ep_size == 1 and self.tp_size == 1 and self.hooks is None and self.assignment_fn is None
                and self._pending_assignment is None and self.extra_counts is None)

    def _preprocess_on_device(self, hidden, routing_map, probs):
        """The EP 1 dispatch on the tokens' device: the rows and probs of Megatron's ``permute``
        (expert-major, token-minor) from :func:`_pair_entries`, sized by the dropless count. The
        counts stay on the device (``last_counts`` ``[1, E]``, ``last_assignment`` ``[1, E, 1]``)."""
        num_pairs = self._dropless_pairs(routing_map)
        counts = routing_map.sum(dim=0).long().unsqueeze(0)
        self.last_counts, self.last_assignment, self.last_extra = counts, counts.unsqueeze(-1), None
        self.dispatches += 1
        self.slots_in_use = self.layout.num_local_experts
        pair_entry = _pair_entries(routing_map, num_pairs)
        self.reversed_mapping = pair_entry % routing_map.shape[0]
        self.send_order = None  # one rank: the pairs are already in slot order
        self.input_splits = self.output_splits = [num_pairs]
        self.tokens_per_slot = counts[0]
        permuted = hidden.index_select(0, self.reversed_mapping)
        permuted_probs = probs.T.reshape(-1).index_select(0, pair_entry)
        return permuted, permuted_probs

    def _choose_assignment(self, counts: torch.Tensor, on_device: bool = False) -> torch.Tensor:
        if self._pending_assignment is not None:
            assign, self._pending_assignment = self._pending_assignment, None
            validate_assignment(assign, counts, self.placement, self.layout)
            return assign
        if self.assignment_fn is None and not self._replicated:
            # no replica: every token goes to its expert's home rank (what any policy gives), built
            # directly where the counts are; the common case of a gated-off or plain layer
            E = self.num_experts
            assign = torch.zeros(self.ep_size, E, self.ep_size, dtype=torch.long, device=counts.device)
            experts = torch.arange(E, device=counts.device)
            assign[:, experts, experts // self.layout.num_local_experts] = counts
            return assign
        if on_device:  # the source's assignment stays where the counts are, checked there
            assign = self.assignment_fn(counts, self.placement, self.layout).long()
            if self.probe_config.validate_assignment:
                check_assignment_async(assign, counts, self._device_table(counts.device) >= 0)
            return assign
        if self.assignment_fn is not None:
            assign = self.assignment_fn(counts, self.placement, self.layout).cpu().long()
        else:
            assign = assignment_from_placement(
                counts, self.placement, self.layout, self.probe_config.assignment_policy
            )
        if self.probe_config.validate_assignment:
            validate_assignment(assign, counts, self.placement, self.layout)
        return assign

    def _all_to_all_bracket(self, kind: str) -> ContextManager[None]:
        return self.hooks.all_to_all(self, kind) if self.hooks is not None else contextlib.nullcontext()

    def token_dispatch(self, hidden_states, probs):
        with self._all_to_all_bracket("dispatch"), nvtx_range("dispatch"):
            tokens = all_to_all(hidden_states, self.output_splits, self.input_splits, self.ep_group)
            probs = all_to_all(probs, self.output_splits, self.input_splits, self.ep_group)
        return tokens, probs

    def dispatch_postprocess(self, hidden_states, probs):
        if self.ep_size > 1 and self.slots_in_use > 1:
            hidden_states, probs = sort_chunks_by_idxs(
                hidden_states, self.recv_counts.ravel(), self._sort_orders[self.slots_in_use][0],
                probs=probs, fused=False,
            )
        if self.hooks is not None:
            self.hooks.before_experts(self)
        return hidden_states, self.tokens_per_slot.clone(), probs

    # ------------------------------------------------------------------ combine
    def combine_preprocess(self, hidden_states):
        if self.ep_size > 1 and self.slots_in_use > 1:
            hidden_states, _ = sort_chunks_by_idxs(
                hidden_states, self.recv_counts.T.ravel(), self._sort_orders[self.slots_in_use][1], fused=False
            )
        return hidden_states

    def token_combine(self, hidden_states):
        with self._all_to_all_bracket("combine"), nvtx_range("combine"):
            return all_to_all(hidden_states, self.input_splits, self.output_splits, self.ep_group)

    def combine_postprocess(self, hidden_states):
        # undo the slot ordering: pair i of the expert-major order was sent at position inv[i]
        if self.send_order is None:  # the dispatch on the device: pairs in the expert-major order
            pairs = hidden_states
        else:
            order = self.send_order.to(hidden_states.device)
            pairs = torch.empty_like(hidden_states).index_copy(0, order, hidden_states)
        out = unpermute(
            pairs, self.reversed_mapping, restore_shape=self.hidden_shape_before_permute,
            routing_map=self.routing_map, fused=False,
        )
        if self.tp_size > 1:  # each expert's output: the sum of its weight shards' outputs
            with self._all_to_all_bracket("etp_reduce"), nvtx_range("etp_reduce"):
                out = all_reduce_sum(out, self.tp_group)
            if self.etp_gathers_tokens:
                out = out[self._own_rows]
        if self.hooks is not None:
            self.hooks.after_combine(self)
        return out.view(self.hidden_shape)
