"""Expert weight bank of one MoE layer on one rank: its native experts and its replica slots.

Native experts: ``fc1 [L, F1, H]`` and ``fc2 [L, H, F]``. These rows *are* the stock expert
module's parameters: the parameters are re-bound as views of them, so the bank costs no extra
memory for native experts and the state dict keeps the stock keys and shapes. If anything
replaces a native parameter's storage (``module.to()``, ``param.data = ...``), the next
:meth:`ExpertBank.weights` call notices the broken view and copies the new weights in, so a stale
bank can never be computed with.

Replica slots: ``R`` rows of each projection that hold copies of other ranks' experts. They come
from one of two places, and everything else is the same:

* the layer's **own** rows (``replica_fc1 [R, F1, H]``, ``replica_fc2``: non-persistent buffers,
  never saved), filled by :meth:`ExpertBank.fill` (the plain PROBE layer);
* a **shared** block attached per forward with :meth:`attach_replicas` (the live pipeline's
  double-buffered banks, :class:`~megatron_probe.mechanism.replica_pool.ReplicaBankPool`); the
  own rows are freed by :meth:`use_shared_replicas`.

Expert compute always sees two blocks per projection, ``[natives, replicas]`` (``S = L + R``
slots in that order).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from megatron_probe.mechanism.comm import group_rank
from megatron_probe.mechanism.replica_pool import placement_record
from megatron_probe.mechanism.transfer import copy_now, replica_copies
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
        self.register_buffer("replica_fc1", None, persistent=False)
        self.register_buffer("replica_fc2", None, persistent=False)
        # what the replica rows in use hold, for every rank ([ep, R], -1 empty): fills and
        # attachments are collective with the same placement on every rank
        self.placement = placement_record(torch.full((layout.ep_size, layout.replica_slots), EMPTY_SLOT))
        self.shared = False  # replicas come from an attached shared block, not the own rows
        self._attached: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self.version = 0  # bumped whenever the native rows are re-allocated
        self.replica_version = 0  # bumped whenever the replica rows in use change identity or content
        self.bytes_received = 0
        # set by use_peer_memory (the natives then readable by every EP rank): each EP rank's
        # rows as read from here
        self._peer_fc1: Optional[List[torch.Tensor]] = None
        self._peer_fc2: Optional[List[torch.Tensor]] = None

    # ------------------------------------------------------------------ native weights
    def adopt(self, fc1_refs: List[ParamRef], fc2_refs: List[ParamRef]) -> None:
        """Make the bank's native rows the storage of these parameters (copied in once); the own
        replica rows follow their shape and dtype (kept when those do not change)."""
        L = self.layout.num_local_experts
        if len(fc1_refs) != L or len(fc2_refs) != L:
            raise ValueError(f"expected {L} native experts, got {len(fc1_refs)} / {len(fc2_refs)}")
        self._fc1_refs, self._fc2_refs = list(fc1_refs), list(fc2_refs)
        # in peer memory the rows every peer reads are the ones written (``module.to()`` may have
        # replaced the fc1 / fc2 buffers themselves). Normal tensors even when called under
        # ``torch.inference_mode()`` (a model moved with ``.cuda()`` is rebuilt at its first served
        # step): inference tensors keep no version counter (``native_version``) and cannot be
        # written outside inference mode (the copy thread, a checkpoint load)
        peer = self._peer_fc1 is not None
        with torch.inference_mode(False):
            self.fc1 = self._rebuild(self._fc1_refs, self._peer_fc1[self.ep_rank] if peer else None)
            self.fc2 = self._rebuild(self._fc2_refs, self._peer_fc2[self.ep_rank] if peer else None)
            self.version += 1
            if not self.shared:
                self.replica_fc1 = self._own_rows(self.replica_fc1, self.fc1)
                self.replica_fc2 = self._own_rows(self.replica_fc2, self.fc2)

    def _rebuild(self, refs: List[ParamRef], current: Optional[torch.Tensor] = None) -> torch.Tensor:
        params = [getattr(m, n) for m, n in refs]
        shape, dtype, device = params[0].shape, params[0].dtype, params[0].device
        for i, p in enumerate(params):
            if p.shape != shape or p.dtype != dtype or p.device != device:
                raise ValueError(
                    f"native expert {i} weight is {tuple(p.shape)} {p.dtype} on {p.device}, "
                    f"expert 0 is {tuple(shape)} {dtype} on {device}; experts must match"
                )
        want = (len(params),) + tuple(shape)
        if current is not None:
            # peer-readable rows never move (every rank maps them): new weights are copied in
            if tuple(current.shape) != want or current.dtype != dtype or current.device != device:
                raise ValueError(f"native weights changed to {want} {dtype} on {device}, but this bank's rows are "
                                 f"in peer memory as {tuple(current.shape)} {current.dtype} on {current.device}, "
                                 "which cannot change: load weights of the same shape and dtype in place")
            bank = current
        else:
            bank = torch.empty(want, dtype=dtype, device=device)
        with torch.no_grad():
            bank.copy_(torch.stack([p.detach() for p in params]))
        self._bind(bank, refs)
        return bank

    @staticmethod
    def _bind(bank: torch.Tensor, refs: List[ParamRef]) -> None:
        """Re-bind each parameter as a view of its row of ``bank`` (attributes kept)."""
        for i, (module, name) in enumerate(refs):
            p = getattr(module, name)
            view = torch.nn.Parameter(bank[i], requires_grad=p.requires_grad)
            view.__dict__.update(p.__dict__)  # keep Megatron's parameter attributes
            setattr(module, name, view)

    # ------------------------------------------------------------------ peer-readable natives
    def use_peer_memory(self) -> None:
        """Move the native rows into memory every rank of the EP group can read
        (``mechanism.peer_memory``: symmetric memory on GPUs, shared-memory files on CPU), so a
        rank can pull a replica straight out of the expert's home rank (:meth:`remote_rows`).
        Collective over the EP group (every rank, every layer in the same order); a no-op once
        done. The parameters stay views of the rows, so the state dict and outputs are unchanged."""
        if self._peer_fc1 is not None:
            return
        from megatron_probe.mechanism.peer_memory import peer_tensors

        self.ensure_current()
        views = []
        for rows, refs in ((self.fc1, self._fc1_refs), (self.fc2, self._fc2_refs)):
            local, peers = peer_tensors(rows.shape, rows.dtype, rows.device, self.ep_group)
            with torch.no_grad():
                local.copy_(rows)
            self._bind(local, refs)
            views.append((local, peers))
        (self.fc1, self._peer_fc1), (self.fc2, self._peer_fc2) = views
        self.version += 1

    def remote_rows(self, expert: int) -> List[torch.Tensor]:
        """``[fc1, fc2]`` of expert ``expert`` on its home rank, read from this rank (needs
        :meth:`use_peer_memory`)."""
        if self._peer_fc1 is None:
            raise RuntimeError("remote_rows needs the natives in peer memory (use_peer_memory())")
        L = self.layout.num_local_experts
        home, j = divmod(int(expert), L)
        if not 0 <= home < self.layout.ep_size:
            raise ValueError(f"expert {expert} is not in 0..{L * self.layout.ep_size - 1}")
        return [self._peer_fc1[home][j], self._peer_fc2[home][j]]

    def _own_rows(self, rows: Optional[torch.Tensor], natives: torch.Tensor) -> torch.Tensor:
        """The own replica rows for natives like ``natives``: the old rows converted when only
        dtype or device changed, zeroed (and the placement forgotten) when the shape changed."""
        R = self.layout.replica_slots
        want = (R,) + tuple(natives.shape[1:])
        if rows is not None and tuple(rows.shape) == want:
            return rows.to(dtype=natives.dtype, device=natives.device)
        self.placement.fill_(EMPTY_SLOT)
        self.replica_version += 1
        return natives.new_zeros(want)

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

    def native_rows(self, expert: int) -> List[torch.Tensor]:
        """``[fc1, fc2]`` of this rank's native expert with global id ``expert``."""
        j = expert - self.ep_rank * self.layout.num_local_experts
        return [self.fc1[j], self.fc2[j]]

    # ------------------------------------------------------------------ what expert compute sees
    def replica_rows(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(fc1 [R, ...], fc2 [R, ...])`` of the replica slots in use. With a shared block not
        attached (nothing planned), a broadcast zero row stands in without allocating: no token
        goes to a replica slot then."""
        if not self.shared:
            return self.replica_fc1, self.replica_fc2
        if self._attached is not None:
            return self._attached
        R = self.layout.replica_slots
        return tuple(b.new_zeros((1,) + tuple(b.shape[1:])).expand((R,) + tuple(b.shape[1:]))
                     for b in (self.fc1, self.fc2))

    def weights(self, differentiable: bool, replicas: bool = True):
        """``([fc1 natives, fc1 replicas], [fc2 natives, fc2 replicas])``: the ``S`` slots in two
        blocks per projection (``replicas=False``: the natives' block alone, for a dispatch with
        no replica). ``differentiable=True`` stacks the native parameters so gradients reach them
        (training; replicas then carry no gradient); otherwise no copy is made."""
        self.ensure_current()
        if differentiable:
            n1, n2 = (torch.stack(p) for p in self.native_params())
        else:
            n1, n2 = self.fc1, self.fc2
        if not replicas:
            return [n1], [n2]
        r1, r2 = self.replica_rows()
        return [n1, r1.detach()], [n2, r2.detach()]

    def weights_version(self) -> Tuple[int, int]:
        """Changes whenever the tensors :meth:`weights` returns change identity (TE caches them)."""
        return self.version, self.replica_version

    def native_version(self) -> Tuple[int, int, int]:
        """Changes whenever the native weights change: re-allocated (``version``) or written in
        place (``load_state_dict``, ``copy_``: the parameter views share the rows' version
        counters). A replica copied from them before a change is stale."""
        self.ensure_current()
        return self.version, self.fc1._version, self.fc2._version

    def expert_bytes(self) -> int:
        if self.fc1 is None or not self.layout.num_local_experts:
            return 0
        return self.fc1[0].numel() * self.fc1.element_size() + self.fc2[0].numel() * self.fc2.element_size()

    def replica_bytes(self) -> int:
        """Replica memory owned by this layer (0 with a shared block: its owner counts it)."""
        return 0 if self.shared else self.layout.replica_slots * self.expert_bytes()

    # ------------------------------------------------------------------ replica slots
    def use_shared_replicas(self) -> None:
        """From now on replicas come from blocks attached with :meth:`attach_replicas`; the own
        rows are freed."""
        if not self.shared:
            self.shared = True
            self.replica_fc1 = self.replica_fc2 = None
            self.placement.fill_(EMPTY_SLOT)
            self.replica_version += 1

    def use_own_replicas(self) -> None:
        """Back to the layer's own replica rows (allocated again, empty), e.g. for a resident
        pipeline after a streamed one."""
        if self.shared:
            self.shared = False
            self._attached = None
            self.replica_fc1 = self._own_rows(None, self.fc1)
            self.replica_fc2 = self._own_rows(None, self.fc2)

    def attach_replicas(self, fc1: torch.Tensor, fc2: torch.Tensor, placement: torch.Tensor) -> None:
        """Compute replica slots from these shared ``[R, ...]`` rows, which hold ``placement``."""
        if not self.shared:
            raise RuntimeError("attach_replicas needs shared replicas (use_shared_replicas())")
        R = self.layout.replica_slots
        if fc1.shape[0] != R or fc1.shape[1:] != self.fc1.shape[1:] or fc2.shape[1:] != self.fc2.shape[1:]:
            raise ValueError(f"replica block {tuple(fc1.shape)}/{tuple(fc2.shape)} does not match {R} slots of "
                             f"{tuple(self.fc1.shape[1:])}/{tuple(self.fc2.shape[1:])}")
        self._attached = (fc1, fc2)
        self.placement = placement_record(placement)
        self.replica_version += 1

    def detach_replicas(self) -> None:
        """No replica in use: forget the attached shared rows (a no-op when none are attached)."""
        if self._attached is None:
            return
        self._attached = None
        self.placement.fill_(EMPTY_SLOT)
        self.replica_version += 1

    def own_slot_rows(self, slot: int) -> List[torch.Tensor]:
        """``[fc1, fc2]`` of one own replica slot (the live pipeline's resident copies land here)."""
        if self.shared:
            raise RuntimeError("this bank uses shared replica rows: it has no own slots")
        return [self.replica_fc1[slot], self.replica_fc2[slot]]

    def set_own_placement(self, placement: torch.Tensor) -> None:
        """Record that the own rows now hold ``placement`` (``[ep, R]``, the same on every rank),
        filled by someone else's copies (the live pipeline's resident mode); a slot whose copy is
        unfinished must be given as empty."""
        if self.shared:
            raise RuntimeError("this bank uses shared replica rows: attach_replicas records their placement")
        placement = placement.detach().cpu().long()
        if not torch.equal(placement, self.placement):
            self.placement = placement_record(placement)
            self.replica_version += 1

    def fill(self, placement: torch.Tensor) -> int:
        """Copy weights so that the own replica rows hold ``placement`` (``[ep, R]``); collective.

        Every rank of the EP group must call it with the same placement. Only slots whose content
        changes move, from each expert's home rank (``transfer.replica_copies``, moved at once by
        ``transfer.copy_now``). Synchronous. Returns the number of slots this rank received.
        """
        if self.shared:
            raise RuntimeError("this bank uses shared replica rows: the pipeline fills them, not fill()")
        validate_placement(placement, self.layout)
        self.ensure_current()
        placement = placement.detach().cpu().long()
        previous = self.placement
        copies = replica_copies(placement, self.layout, self.ep_rank,
                                unchanged=lambda r, s, e: e == int(previous[r, s]),
                                native_rows=self.native_rows,
                                slot_rows=lambda s: [self.replica_fc1[s], self.replica_fc2[s]])
        copy_now(copies, self.ep_group)
        self.placement = placement_record(placement)
        if copies.received:
            self.replica_version += 1
        self.bytes_received += copies.received * self.expert_bytes()
        return copies.received
