"""Token-to-expert dispatch on the device, with sizes fixed by the shapes alone.

The grouped GEMMs of ``moe.py`` run over *rows*: the (token, choice) slots sorted by expert, each
expert's rows padded to a multiple of the GEMMs' BLOCK_M so that every M tile belongs to one
expert. Computing that layout needs the per-expert counts, which live on the device; reading them
on the host would sync every forward and break CUDA-graph capture. So nothing leaves the device:

- the rows buffer has a bound known from the shapes: ``slots + min(slots, experts) * (BLOCK_M - 1)``
  (each expert with rows pads at most BLOCK_M - 1), and the GEMMs launch one program per
  possible M tile; tiles past the last expert's rows return at once;
- ``_rank_kernel`` counts slots per expert with atomics, each slot keeping its rank (its place
  among its expert's slots; the order among them is whatever the atomics gave, which changes no
  result: GEMM rows are computed independently of each other);
- ``_place_kernel`` turns the counts into padded offsets (each program recomputes the prefix sum
  over the experts, a few hundred values, instead of a separate launch) and writes each slot's
  index at its row (``tl.gather`` of its expert's offset);
- the GEMMs find their tile's expert from the same counts (``tile_expert``).

That is three launches (a memset and two kernels). Up to ``SMALL_SLOTS`` slots (decode), one
program does it all in one launch instead: counts and ranks by comparing every slot with every
other (``_dispatch_small_kernel``), ranks then in slot order.

Slots routed to an expert id outside [0, E) get no row (they contribute nothing, as in the
reference).
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .launch import cdiv, next_power_of_2

_SLOTS_PER_PROGRAM = 256

SMALL_SLOTS = 128
"""Up to this many slots, ``_dispatch_small_kernel`` (one launch, an all-pairs comparison)."""


@triton.jit
def _padded_bounds(counts, BLOCK_M: tl.constexpr):
    """Per expert, from its row count: (first padded row, one past its last padded row)."""
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    return ends - padded, ends


@triton.jit
def expert_offsets(counts_ptr, EXPERTS, BLOCK_M: tl.constexpr, EXPERTS_POW2: tl.constexpr):
    """Per expert (padded to EXPERTS_POW2 with empty experts): (expert indices, row counts, first
    padded row, one past the last padded row)."""
    experts = tl.arange(0, EXPERTS_POW2)
    counts = tl.load(counts_ptr + experts, mask=experts < EXPERTS, other=0)
    starts, ends = _padded_bounds(counts, BLOCK_M)
    return experts, counts, starts, ends


@triton.jit
def _routed_slots(ids_ptr, slots, SLOTS, EXPERTS):
    """The expert ids of ``slots`` (int32) and which of them are routed (a slot < SLOTS whose id
    lies in [0, EXPERTS))."""
    ids = tl.load(ids_ptr + slots, mask=slots < SLOTS, other=-1).to(tl.int32)
    return ids, (slots < SLOTS) & (ids >= 0) & (ids < EXPERTS)


@triton.jit
def tile_expert(counts_ptr, row0, EXPERTS, BLOCK_M: tl.constexpr, EXPERTS_POW2: tl.constexpr):
    """The expert owning the M tile that starts at padded row ``row0``, the tile's rows, and
    which of them hold a slot: (expert, rows (BLOCK_M,), mask). ``expert >= EXPERTS``: the tile
    is past the last expert's rows (nothing to do)."""
    experts, counts, starts, ends = expert_offsets(counts_ptr, EXPERTS, BLOCK_M, EXPERTS_POW2)
    expert = tl.sum((ends <= row0).to(tl.int32), axis=0)
    mine = experts == expert
    first = tl.sum(tl.where(mine, starts, 0), axis=0)
    count = tl.sum(tl.where(mine, counts, 0), axis=0)
    rows = row0 + tl.arange(0, BLOCK_M)
    return expert, rows, rows - first < count


@triton.jit
def tile_rows(tile, counts_ptr, slot_of_row_ptr, ids_ptr, EXPERTS, BLOCK_M: tl.constexpr, EXPERTS_POW2: tl.constexpr,
              DIRECT: tl.constexpr):
    """What M tile ``tile`` of a grouped GEMM holds: (expert, rows (BLOCK_M,), which rows hold a
    slot, their slots). Grouped rows: ``tile_expert``'s, the slots from ``slot_of_row``.
    ``DIRECT`` (a few slots, no dispatch): tile t is slot t alone, at row t, its expert read from
    ``ids_ptr`` (the rows after it are masked). ``expert >= EXPERTS``: nothing to do."""
    if DIRECT:
        expert = tl.load(ids_ptr + tile).to(tl.int32)
        expert = tl.where(expert >= 0, expert, EXPERTS)  # routed to no expert
        rows = tile + tl.arange(0, BLOCK_M)
        return expert, rows, tl.arange(0, BLOCK_M) == 0, rows
    expert, rows, routed = tile_expert(counts_ptr, tile * BLOCK_M, EXPERTS, BLOCK_M, EXPERTS_POW2)
    return expert, rows, routed, tl.load(slot_of_row_ptr + rows, mask=routed, other=0).to(tl.int32)


@triton.jit
def _rank_kernel(ids_ptr, counts_ptr, ranks_ptr, SLOTS, EXPERTS, BLOCK: tl.constexpr):
    """counts[e] (zeroed) <- number of slots routed to e; ranks[slot] <- the slot's place among them."""
    slots = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ids, routed = _routed_slots(ids_ptr, slots, SLOTS, EXPERTS)
    rank = tl.atomic_add(counts_ptr + tl.where(routed, ids, 0), 1, mask=routed)
    tl.store(ranks_ptr + slots, rank, mask=routed)


@triton.jit
def _place_kernel(ids_ptr, counts_ptr, ranks_ptr, slot_of_row_ptr, SLOTS, EXPERTS, BLOCK_M: tl.constexpr,
                  EXPERTS_POW2: tl.constexpr, BLOCK: tl.constexpr):
    """slot_of_row[first padded row of e + rank] <- slot, for every routed slot."""
    _, _, starts, _ = expert_offsets(counts_ptr, EXPERTS, BLOCK_M, EXPERTS_POW2)
    slots = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ids, routed = _routed_slots(ids_ptr, slots, SLOTS, EXPERTS)
    first = tl.gather(starts, tl.where(routed, ids, 0), 0)
    rank = tl.load(ranks_ptr + slots, mask=routed, other=0)
    tl.store(slot_of_row_ptr + first + rank, slots, mask=routed)


@triton.jit
def _dispatch_small_kernel(ids_ptr, counts_ptr, slot_of_row_ptr, SLOTS, EXPERTS, BLOCK_M: tl.constexpr,
                           EXPERTS_POW2: tl.constexpr, SLOTS_POW2: tl.constexpr):
    """counts and slot_of_row of a few slots in one program, without atomics (no zeroed counts)."""
    slots = tl.arange(0, SLOTS_POW2)
    ids, routed = _routed_slots(ids_ptr, slots, SLOTS, EXPERTS)
    ids = tl.where(routed, ids, EXPERTS_POW2)  # matches no expert
    experts = tl.arange(0, EXPERTS_POW2)
    counts = tl.sum((ids[None, :] == experts[:, None]).to(tl.int32), axis=1)
    tl.store(counts_ptr + experts, counts, mask=experts < EXPERTS)
    starts, _ = _padded_bounds(counts, BLOCK_M)
    rank = tl.sum(((ids[None, :] == ids[:, None]) & (slots[None, :] < slots[:, None])).to(tl.int32), axis=1)
    first = tl.gather(starts, tl.where(routed, ids, 0), 0)
    tl.store(slot_of_row_ptr + first + rank, slots, mask=routed)


@dataclass(frozen=True)
class Dispatch:
    """Rows grouped by expert: ``slot_of_row[r]`` is the slot (token * k + choice) at padded row r
    (rows of padding hold garbage, masked by ``tile_expert``); ``counts[e]`` rows per expert."""

    counts: torch.Tensor
    slot_of_row: torch.Tensor
    block_m: int
    experts_pow2: int

    @property
    def tiles(self) -> int:
        """Upper bound on the number of M tiles (the GEMMs' grid size along M)."""
        return self.slot_of_row.numel() // self.block_m


def padded_rows(slots: int, experts: int, block_m: int) -> int:
    """Rows the grouped layout can need at most, a multiple of ``block_m``."""
    return cdiv(slots + min(slots, experts) * (block_m - 1), block_m) * block_m


def dispatch_tokens(topk_ids: torch.Tensor, experts: int, block_m: int) -> Dispatch:
    """Group the slots of ``topk_ids`` (T, k) by expert on the device (no host sync)."""
    ids = topk_ids.reshape(-1)
    if not ids.is_contiguous():
        ids = ids.contiguous()
    slots = ids.numel()
    slot_of_row = torch.empty(padded_rows(slots, experts, block_m), dtype=torch.int32, device=ids.device)
    experts_pow2 = next_power_of_2(experts)
    if slots <= SMALL_SLOTS:
        counts = torch.empty(experts, dtype=torch.int32, device=ids.device)
        _dispatch_small_kernel[(1,)](ids, counts, slot_of_row, slots, experts, BLOCK_M=block_m,
                                     EXPERTS_POW2=experts_pow2, SLOTS_POW2=next_power_of_2(slots))
        return Dispatch(counts, slot_of_row, block_m, experts_pow2)
    counts = torch.zeros(experts, dtype=torch.int32, device=ids.device)
    ranks = torch.empty(slots, dtype=torch.int32, device=ids.device)
    grid = (cdiv(slots, _SLOTS_PER_PROGRAM),)
    _rank_kernel[grid](ids, counts, ranks, slots, experts, BLOCK=_SLOTS_PER_PROGRAM)
    _place_kernel[grid](ids, counts, ranks, slot_of_row, slots, experts, BLOCK_M=block_m, EXPERTS_POW2=experts_pow2,
                        BLOCK=_SLOTS_PER_PROGRAM)
    return Dispatch(counts, slot_of_row, block_m, experts_pow2)
