"""Sampled soft-max over the "recent" negative instances (docs/method.md §4).

The soft-max denominator of step t runs over C_t = unique(current batch ids ∪ the K most recently pushed ids)
instead of all N instances. Decision for the open point of docs/method.md §4: the current batch does NOT count toward K.
The FIFO holds the ids of previous batches only, so |C_t| ≤ K + B.

The FIFO is a ring of the last K ids pushed. When B divides K this is exactly the last K/B batches. Otherwise it
holds the last ceil(K/B) batches with the head of the oldest one dropped, which keeps the bound |C_t| ≤ K + B.

Everything stays on the ids' device (int64 tensors). `candidates()` (torch.unique) is the readable reference and
returns |C_t| ids, a data-dependent size (a host sync on CUDA); the training step uses `candidate_slots()`, the same
set as K+B fixed slots with duplicates marked, which needs no sync. With DDP the caller gathers the ids of all ranks
first (all_gather of the batch ids), so every rank builds the same C_t. `batch_size` is then the global B.
`k=None` or `k >= num_instances` means full soft-max: see `uses_full_softmax`, the caller then skips this class.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch


class Slots(NamedTuple):
    """The K+B candidate slots of a step (`RecentNegatives.slots`)."""

    rows: torch.Tensor  # int64 [K+B] sorted ids
    valid: torch.Tensor  # bool [K+B] first slot of each id
    src: torch.Tensor  # int64 [K+B] the valid slot of each slot's id
    targets: torch.Tensor  # int64 [B] the valid slot of each batch id
    order: torch.Tensor  # int64 [K+B] unsorted slot ([ring, batch]) at each sorted position
    slot_of: torch.Tensor  # int64 [K+B] sorted position of each unsorted slot


def uses_full_softmax(k: int | None, num_instances: int) -> bool:
    """True when the sampled soft-max would cover every instance anyway."""
    return k is None or k >= num_instances


def _as_ids(ids: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(ids)) if isinstance(ids, np.ndarray) else ids
    if t.dim() != 1:
        raise ValueError(f"batch ids must be 1-D, got shape {tuple(t.shape)}")
    return t.detach().to(torch.int64)


class RecentNegatives:
    """FIFO of the K most recent positive ids, and the candidate set built from it.

    Per step:  cand, targets = bank.candidates(ids); ...forward on W[cand]...; bank.push(ids)
    """

    def __init__(self, k: int, batch_size: int) -> None:
        if k < 1 or batch_size < 1:
            raise ValueError(f"k and batch_size must be >= 1, got k={k}, batch_size={batch_size}")
        self.k, self.batch_size = int(k), int(batch_size)
        self._ring: torch.Tensor | None = None  # int64 [K], allocated on the device of the first push
        self._ptr = 0  # next write position in the ring
        self._filled = 0  # valid entries: ring[:filled] (the ring fills from 0 before it wraps)

    @property
    def num_batches(self) -> int:
        """ceil(K/B): previous batches the FIFO spans."""
        return -(-self.k // self.batch_size)

    @property
    def max_candidates(self) -> int:
        """Upper bound on |C_t| (K + B), e.g. for preallocating logits."""
        return self.k + self.batch_size

    def candidates(self, batch_ids: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """C_t and the targets of the current batch.

        batch_ids: int [B] (numpy or tensor, any device), B ≤ batch_size.
        Returns cand int64 [|C_t|] (sorted, unique, on batch_ids' device; CPU for numpy input) and
        targets int64 [B] with cand[targets] == batch_ids.
        """
        ids = _as_ids(batch_ids)
        if ids.numel() > self.batch_size:
            raise ValueError(f"batch of {ids.numel()} ids exceeds batch_size={self.batch_size}")
        parts = [ids]
        if self._filled:
            self._follow(ids.device)
            parts.append(self._ring[: self._filled])
        cand, inverse = torch.unique(torch.cat(parts), sorted=True, return_inverse=True)
        return cand, inverse[: ids.numel()]

    def candidate_slots(self, batch_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """C_t as K+B fixed slots (static shapes, no host sync), for the training step.

        `candidates()` needs `torch.unique`, whose data-dependent size costs a host sync every step. Here the slots
        are the current batch and the whole ring (an unfilled ring padded with a copy of the batch's first id),
        sorted; duplicates are kept but marked.
        Returns rows int64 [K+B] (sorted ids), valid bool [K+B] (the first slot of each id: exactly C_t), src int64
        [K+B] (index of the valid slot holding the same id: duplicates copy its update), targets int64 [B] (the
        valid slot of each batch id).
        """
        s = self.slots(batch_ids)
        return s.rows, s.valid, s.src, s.targets

    def slots(self, batch_ids: torch.Tensor) -> Slots:
        """`candidate_slots`, plus where each slot came from (for a cache of the ring's rows, model/bank/ring_cache.py).

        The unsorted slots are [ring (K), batch (B)]; `order` [K+B] is the unsorted slot at each sorted position and
        `slot_of` [K+B] the sorted position of each unsorted slot. Among equal ids a filled ring slot sorts first,
        so the valid slot of an id that is in the ring is a ring slot (the ring's cached row is the one in use).
        """
        ids = _as_ids(batch_ids)
        if ids.numel() > self.batch_size:
            raise ValueError(f"batch of {ids.numel()} ids exceeds batch_size={self.batch_size}")
        if self._ring is None:
            ring = ids[:1].expand(self.k)
        else:
            self._follow(ids.device)
            ring = self._ring if self._filled == self.k else torch.cat(
                [self._ring[: self._filled], ids[:1].expand(self.k - self._filled)])
        # sort key 2·id (+1 for batch and padding slots): ids sort as before, filled ring slots first among equals
        fresh = torch.ones(self.k + ids.numel(), dtype=torch.int64, device=ids.device)
        fresh[: self._filled] = 0
        keys, order = torch.sort(torch.cat([ring, ids]) * 2 + fresh)
        rows = keys >> 1
        valid = torch.ones_like(rows, dtype=torch.bool)
        valid[1:] = rows[1:] != rows[:-1]
        positions = torch.arange(rows.numel(), device=rows.device)
        src = torch.cummax(torch.where(valid, positions, torch.zeros_like(positions)), 0).values
        slot_of = torch.empty_like(order)
        slot_of[order] = positions  # unsorted slot -> sorted position
        return Slots(rows, valid, src, src[slot_of[self.k:]], order, slot_of)

    @property
    def ptr(self) -> int:
        """The ring slot the next push writes first: a push of n ids writes the last m = min(n, K) of them to slots
        (ptr + i) % K, i < m; while the ring fills, ptr == filled, so slot i is overwritten (held an id) iff
        i ≥ K − filled."""
        return self._ptr

    @property
    def filled(self) -> int:
        """Ring slots holding an id: ring[:filled] (the ring fills from 0 before it wraps)."""
        return self._filled

    def oldest_first(self) -> np.ndarray:
        """int64 [filled]: the ring slots from the oldest id to the newest (the order of `state_dict`'s ids)."""
        if self._filled < self.k:
            return np.arange(self._filled)
        return (self._ptr + np.arange(self.k)) % self.k

    def ring(self) -> torch.Tensor | None:
        """The ring of ids (int64 [K], slot order, valid in [:filled]); None before the first push."""
        return self._ring

    def push(self, batch_ids: np.ndarray | torch.Tensor) -> None:
        """Append a batch (call after its step). The ids are copied, so loaders may recycle their buffers."""
        ids = _as_ids(batch_ids)[-self.k :]
        if self._ring is None:
            self._ring = torch.empty(self.k, dtype=torch.int64, device=ids.device)
        self._follow(ids.device)
        n = ids.numel()
        first = min(n, self.k - self._ptr)
        self._ring[self._ptr : self._ptr + first] = ids[:first]
        self._ring[: n - first] = ids[first:]  # wrap-around part (empty when nothing wraps)
        self._ptr = (self._ptr + n) % self.k
        self._filled = min(self._filled + n, self.k)

    def state_dict(self) -> dict:
        """The recent ids oldest first, as one CPU int64 tensor, plus the sizes."""
        return {"k": self.k, "batch_size": self.batch_size, "recent": self._ordered().cpu()}

    def load_state_dict(self, state: dict, device: torch.device | str | None = None) -> None:
        """Restore from `state_dict()`; the ring goes to `device` (default: moved lazily to the ids' device)."""
        if int(state["k"]) != self.k or int(state["batch_size"]) != self.batch_size:
            raise ValueError(f"saved k/batch_size {state['k']}/{state['batch_size']} != {self.k}/{self.batch_size}")
        self._ring, self._ptr, self._filled = None, 0, 0
        recent = state["recent"]
        if recent.numel():
            self.push(recent.to(device) if device is not None else recent)

    def _follow(self, device: torch.device) -> None:
        """Move the ring to the device the ids live on (once, e.g. after loading a CPU checkpoint)."""
        if self._ring.device != device:
            self._ring = self._ring.to(device)

    def _ordered(self) -> torch.Tensor:
        """The FIFO's ids oldest first."""
        if self._ring is None:
            return torch.empty(0, dtype=torch.int64)
        if self._filled < self.k:
            return self._ring[: self._filled].clone()
        return torch.cat([self._ring[self._ptr :], self._ring[: self._ptr]])
