"""Double-buffered replica banks shared by all MoE layers of a rank.

Every rank keeps two banks of ``R`` expert slots (fc1 and fc2 weights per slot). MoE layer L
computes its replicas from bank ``L % 2`` while the copies for layer L+1 land in the other bank,
so replica memory is ``2 R`` experts per rank whatever the number of layers. The pool records
what each bank holds (``[ep, R]`` expert ids of one layer, the same table on every rank) so an
unchanged slot is not copied again.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from megatron_probe.policy.placement import EMPTY_SLOT, ExpertLayout


def placement_record(placement: torch.Tensor) -> torch.Tensor:
    """A placement ``[ep, R]`` as a new int64 host tensor for a record that is later written in
    place (``fill_``): never an inference tensor, even when taken inside ``torch.inference_mode()``
    (the serving engine's step), since such a tensor refuses in-place writes outside it."""
    with torch.inference_mode(False):
        return placement.detach().cpu().long().clone()


NUM_BANKS = 2


class ReplicaBankPool:
    def __init__(self, layout: ExpertLayout, fc1_shape: Tuple[int, ...], fc2_shape: Tuple[int, ...],
                 dtype: torch.dtype, device: torch.device, memory_cap_bytes: Optional[int] = None):
        R = layout.replica_slots
        if R <= 0:
            raise ValueError("a replica bank pool needs replica_slots_per_rank >= 1")
        self.layout = layout
        elem = torch.empty((), dtype=dtype).element_size()
        per_expert = (_numel(fc1_shape) + _numel(fc2_shape)) * elem
        need = NUM_BANKS * R * per_expert
        if memory_cap_bytes is not None and need > memory_cap_bytes:
            fit = memory_cap_bytes // (NUM_BANKS * per_expert)
            raise ValueError(
                f"replica banks need {_mib(need)} MiB per rank ({NUM_BANKS} banks x {R} slots x "
                f"{_mib(per_expert)} MiB per expert), over replica_memory_cap_mib={_mib(memory_cap_bytes)}; "
                f"valid: replica_slots_per_rank <= {fit} at this cap, or replica_memory_cap_mib >= {_mib(need, up=True)}")
        self.expert_bytes = per_expert
        with torch.inference_mode(False):  # written by the copy thread, outside any inference mode
            self.fc1 = torch.zeros((NUM_BANKS, R) + tuple(fc1_shape), dtype=dtype, device=device)
            self.fc2 = torch.zeros((NUM_BANKS, R) + tuple(fc2_shape), dtype=dtype, device=device)
        # what each bank's slots hold, for every rank: expert ids of layer `held_layer[b]`
        self.held = [placement_record(torch.full((layout.ep_size, R), EMPTY_SLOT)) for _ in range(NUM_BANKS)]
        self.held_layer = [None] * NUM_BANKS
        # the version of the natives each bank's copies were made from (ExpertBank.native_version)
        self.held_version = [None] * NUM_BANKS

    @staticmethod
    def bank_of(layer: int) -> int:
        return layer % NUM_BANKS

    def memory_bytes(self) -> int:
        return self.fc1.numel() * self.fc1.element_size() + self.fc2.numel() * self.fc2.element_size()

    def block(self, bank: int):
        """``(fc1 [R, F1, H], fc2 [R, H, F])`` of one bank."""
        return self.fc1[bank], self.fc2[bank]

    def slot_tensors(self, bank: int, slot: int):
        return [self.fc1[bank, slot], self.fc2[bank, slot]]

    def holds(self, bank: int, layer: int, rank: int, slot: int, expert: int) -> bool:
        return self.held_layer[bank] == layer and int(self.held[bank][rank, slot]) == expert

    def forget_if_stale(self, bank: int, layer: int, version) -> None:
        """Drop ``bank``'s record when it holds copies of ``layer`` made from natives of another
        ``version``: the weights changed since (a reload, in place or not), so every slot is
        re-sent."""
        if self.held_layer[bank] == layer and self.held_version[bank] != version:
            self.held_layer[bank] = None

    def mark(self, bank: int, layer: int, placement: torch.Tensor, version=None) -> None:
        """Record that ``bank`` now holds (or is being filled with) ``placement`` of ``layer``,
        copied from natives of ``version``."""
        if self.held_layer[bank] != layer:
            self.held[bank].fill_(EMPTY_SLOT)
        self.held_layer[bank] = layer
        self.held_version[bank] = version
        self.held[bank] = placement_record(placement)


def _mib(nbytes: int, up: bool = False) -> str:
    """MiB to 3 significant digits (0.0234, 1.5, 136); ``up``: rounded up, so it still fits."""
    v = nbytes / 2**20
    if up and v > 0:
        scale = 10 ** (2 - math.floor(math.log10(v)))
        v = math.ceil(v * scale) / scale
    return f"{v:.3g}"


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
