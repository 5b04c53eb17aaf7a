"""Expert weight bank: native experts and replica slots of one rank in one tensor per projection.

``fc1[S, F1, H]`` and ``fc2[S, H, F]`` with ``S = L + R``. Rows ``0..L-1`` *are* the stock expert
module's parameters: the parameters are re-bound as views of these rows, so the bank costs no
extra memory for native experts and the state dict keeps the stock keys and shapes. Rows
``L..L+R-1`` are replica slots: plain buffers, never saved, filled by :meth:`ExpertBank.fill`.

If anything replaces a native parameter's storage (``module.to()``, ``param.data = ...``), the
next :meth:`ExpertBank.weights` call notices the broken view and copies the new weights in, so a
stale bank can never be computed with.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_probe.mechanism.comm import global_rank, group_rank, needs_host_staging
from megatron_probe.policy.placement import EMPTY_SLOT, ExpertLayout, validate_placement

ParamRef = Tuple[torch.nn.Module, str]


class ExpertBank(torch.nn.Module):
    def __init__(self, layout: ExpertLayout, ep_group=None):
        super().__init__()
        self.layout = layout
        self.ep_group = ep_group
        self.ep_rank = group_rank(ep_group)
        self._fc1_refs: List[ParamRef] = []
        self._fc2_refs: List[ParamRef] = []
        self.register_buffer("fc1", None, persistent=False)
        self.register_buffer("fc2", None, persistent=False)
        # the placement the replica slots of every rank hold (-1: empty); fill() is collective
        # with the same placement on every rank, so each rank can keep the whole table
        self.placement = torch.full((layout.ep_size, layout.replica_slots), EMPTY_SLOT, dtype=torch.long)
        self.version = 0  # bumped whenever the bank tensors are re-allocated
        self.bytes_received = 0
        # pooled mode: replica slots live in a ReplicaBankPool shared by all layers; this bank
        # keeps only the native rows and computes replicas from `replica_block`
        self.pooled = False
        self.replica_block: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self.replica_version = 0

    # ------------------------------------------------------------------ native weights
    def adopt(self, fc1_refs: List[ParamRef], fc2_refs: List[ParamRef]) -> None:
        """Make the bank's native rows the storage of these parameters (copied in once)."""
        L = self.layout.num_local_experts
        if len(fc1_refs) != L or len(fc2_refs) != L:
            raise ValueError(f"expected {L} native experts, got {len(fc1_refs)} / {len(fc2_refs)}")
        self._fc1_refs, self._fc2_refs = list(fc1_refs), list(fc2_refs)
        self.fc1 = self._rebuild(self._fc1_refs, self.fc1)
        self.fc2 = self._rebuild(self._fc2_refs, self.fc2)
        self.version += 1

    def use_pool(self) -> None:
        """Switch to pooled replicas: free this layer's own replica rows (the pool's banks are
        attached per forward with :meth:`attach_replicas`)."""
        if not self.pooled:
            self.pooled = True
            self.placement.fill_(EMPTY_SLOT)
            self.adopt(self._fc1_refs, self._fc2_refs)

    def attach_replicas(self, fc1: torch.Tensor, fc2: torch.Tensor, placement: torch.Tensor) -> None:
        """Compute replica slots from these ``[R, ...]`` pool tensors, which hold ``placement``."""
        if not self.pooled:
            raise RuntimeError("attach_replicas needs pooled mode (use_pool())")
        R = self.layout.replica_slots
        if fc1.shape[0] != R or fc1.shape[1:] != self.fc1.shape[1:] or fc2.shape[1:] != self.fc2.shape[1:]:
            raise ValueError(f"replica block {tuple(fc1.shape)}/{tuple(fc2.shape)} does not match {R} slots of "
                             f"{tuple(self.fc1.shape[1:])}/{tuple(self.fc2.shape[1:])}")
        self.replica_block = (fc1, fc2)
        self.placement = placement.detach().cpu().long().clone()
        self.replica_version += 1

    def _rebuild(self, refs: List[ParamRef], old_bank: Optional[torch.Tensor]) -> torch.Tensor:
        L, R = self.layout.num_local_experts, (0 if self.pooled else self.layout.replica_slots)
        params = [getattr(m, n) for m, n in refs]
        shape, dtype, device = params[0].shape, params[0].dtype, params[0].device
        for i, p in enumerate(params):
            if p.shape != shape or p.dtype != dtype or p.device != device:
                raise ValueError(
                    f"native expert {i} weight is {tuple(p.shape)} {p.dtype} on {p.device}, "
                    f"expert 0 is {tuple(shape)} {dtype} on {device}; experts must match"
                )
        bank = torch.empty((L + R,) + tuple(shape), dtype=dtype, device=device)
        with torch.no_grad():
            bank[:L].copy_(torch.stack([p.detach() for p in params]))
            if R:
                if old_bank is not None and tuple(old_bank.shape[1:]) == tuple(shape):
                    bank[L:].copy_(old_bank[L:])
                else:
                    bank[L:].zero_()
                    self.placement.fill_(EMPTY_SLOT)
        for i, ((module, name), p) in enumerate(zip(refs, params)):
            view = torch.nn.Parameter(bank[i], requires_grad=p.requires_grad)
            view.__dict__.update(p.__dict__)  # keep Megatron's parameter attributes
            setattr(module, name, view)
        return bank

    def _views_intact(self) -> bool:
        for bank, refs in ((self.fc1, self._fc1_refs), (self.fc2, self._fc2_refs)):
            if bank is None:
                return False
            for i, (m, n) in enumerate(refs):
                p = getattr(m, n)
                if p.data_ptr() != bank[i].data_ptr() or p.shape != bank.shape[1:] or p.dtype != bank.dtype:
                    return False
        return True

    def ensure_current(self) -> None:
        if not self._views_intact():
            self.adopt(self._fc1_refs, self._fc2_refs)

    def native_params(self) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        return ([getattr(m, n) for m, n in self._fc1_refs], [getattr(m, n) for m, n in self._fc2_refs])

    def weights(self, differentiable: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(fc1, fc2)`` for all ``S`` slots.

        ``differentiable=True`` stacks the native parameters so gradients reach them (training);
        otherwise the bank itself is returned, with no copy (inference).
        """
        self.ensure_current()
        if self.pooled:
            if differentiable:
                raise NotImplementedError("pooled replica banks are for inference")
            R = self.layout.replica_slots
            rep = self.replica_block
            if rep is None:  # nothing attached: no token goes to a replica slot; a broadcast zero
                # row stands in for the R slots without allocating them
                rep = (self.fc1.new_zeros((1,) + tuple(self.fc1.shape[1:])).expand((R,) + tuple(self.fc1.shape[1:])),
                       self.fc2.new_zeros((1,) + tuple(self.fc2.shape[1:])).expand((R,) + tuple(self.fc2.shape[1:])))
            return [self.fc1, rep[0]], [self.fc2, rep[1]]
        if not differentiable:
            return self.fc1, self.fc2
        L = self.layout.num_local_experts
        n1, n2 = self.native_params()
        fc1 = torch.cat([torch.stack(n1), self.fc1[L:].detach()])
        fc2 = torch.cat([torch.stack(n2), self.fc2[L:].detach()])
        return fc1, fc2

    def expert_bytes(self) -> int:
        L = self.layout.num_local_experts
        return (self.fc1[0].numel() * self.fc1.element_size()) + (
            self.fc2[0].numel() * self.fc2.element_size()
        ) if L else 0

    def replica_bytes(self) -> int:
        """Replica memory owned by this layer (0 in pooled mode: the pool owns it)."""
        return 0 if self.pooled else self.layout.replica_slots * self.expert_bytes()

    # ------------------------------------------------------------------ replica slots
    def fill(self, placement: torch.Tensor) -> int:
        """Copy weights so that replica slots hold ``placement`` (``[ep, R]``); collective.

        Every rank of the EP group must call it with the same placement. Only slots whose
        content changes move; the copies are point-to-point from each expert's home rank.
        Synchronous: returns when this rank's copies are complete. Returns the number of
        slots this rank received.
        """
        layout = self.layout
        if self.pooled:
            raise RuntimeError("this bank uses a shared replica pool: the pipeline fills it, not fill()")
        validate_placement(placement, layout)
        self.ensure_current()
        placement = placement.detach().cpu().long()
        L, R, ep = layout.num_local_experts, layout.replica_slots, layout.ep_size
        me = self.ep_rank
        ops = []
        received = 0
        previous = self.placement
        tag = 0
        for r in range(ep):
            for s in range(R):
                e = int(placement[r, s])
                changed = e != int(previous[r, s])
                tag += 2
                if e == EMPTY_SLOT or not changed:
                    continue
                home = e // L
                if me == home:
                    ops.append(self._isend(self.fc1[e - home * L], r, tag))
                    ops.append(self._isend(self.fc2[e - home * L], r, tag + 1))
                if me == r:
                    ops.append(self._irecv(self.fc1[L + s], home, tag))
                    ops.append(self._irecv(self.fc2[L + s], home, tag + 1))
                    received += 1
        for work, finish in ops:
            work.wait()
            if finish is not None:
                finish()
        self.placement = placement.clone()
        self.bytes_received += received * self.expert_bytes()
        return received

    def _isend(self, t: torch.Tensor, dst: int, tag: int):
        if dst == self.ep_rank:
            raise RuntimeError("a rank never sends a replica to itself")  # placement forbids it
        buf = t.detach().cpu() if needs_host_staging(self.ep_group, t) else t.detach().contiguous()
        work = dist.isend(buf, global_rank(self.ep_group, dst), group=self.ep_group, tag=tag)
        return work, None

    def _irecv(self, t: torch.Tensor, src: int, tag: int):
        if needs_host_staging(self.ep_group, t):
            buf = torch.empty(t.shape, dtype=t.dtype)
            work = dist.irecv(buf, global_rank(self.ep_group, src), group=self.ep_group, tag=tag)
            return work, lambda: t.copy_(buf)
        return dist.irecv(t, global_rank(self.ep_group, src), group=self.ep_group, tag=tag), None
