"""Memory the eager decoder keeps from one sampling call to the next, so that the next call reuses it instead of
page-faulting on fresh pages from the OS: the KV buffers' storage, and the packed weights' memory. Only memory is
carried over, never values: every call writes its own keys and values and packs the current weights.
"""

from __future__ import annotations

import threading
from collections import deque

import torch
from torch import Tensor

from outrider.policy import onednn

MAX_BYTES = 64 * 2 ** 20  # more than this is never kept, for either


class KVStorage:
    """Storage for an eager decoder's KV buffers, kept from one sampling call to the next. A fresh buffer of a
    few MB comes from the OS as new pages, and writing them page-faults (on the benchmark, about 3,100 faults a
    call on the 0.54M model and 8,000 on the 4.2M one, where `generate`, reusing its allocator's memory, takes
    none). One decoder holds it at a time; another meanwhile gets fresh memory. Buffers above `MAX_BYTES` are
    never kept."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._storage: Tensor | None = None
        self._busy = False

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """`numel` elements: the kept storage if free and big enough (else new memory, kept if not too big)."""
        with self._lock:
            if self._busy or numel * dtype.itemsize > MAX_BYTES:
                return torch.empty(numel, dtype=dtype, device=device)
            kept = self._storage
            if kept is None or kept.numel() < numel or kept.dtype != dtype or kept.device != device:
                kept = self._storage = torch.empty(numel, dtype=dtype, device=device)
            self._busy = True
            return kept[:numel]

    def give_back(self, flat: Tensor) -> None:
        with self._lock:
            if self._storage is not None and flat.data_ptr() == self._storage.data_ptr():
                self._busy = False


KV_STORAGE = KVStorage()


class PackRecycler:
    """Keeps the last sampling call's packed weights until the next call packs, to hand it their memory.

    Each pack is fresh memory (up to a few MB). Freed together at the end of a call, it went back to the OS, and
    the next call's packs page-faulted on new pages: about 4,000 faults and 3–5 ms a call on the 4.2M benchmark
    model. Freeing the kept weights one at a time, each right before the next pack (calls pack in the same order),
    lets malloc hand the same memory straight back. Only memory is reused, never values: every pack reads the
    current weights. Sets above `MAX_BYTES` are not kept."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: deque[Tensor] = deque()

    def pack(self, weight: Tensor, batch: int) -> Tensor:
        """`onednn.pack(weight, batch)`, after freeing the oldest kept weight."""
        with self._lock:
            if self._kept:
                self._kept.popleft()
        return onednn.pack(weight, batch)

    def keep(self, packed: list[Tensor]) -> None:
        """Keep `packed` (a finished call's packs, in packing order) in place of what was kept."""
        small_enough = sum(w.numel() * w.element_size() for w in packed) <= MAX_BYTES
        with self._lock:
            self._kept = deque(packed if small_enough else ())


PACKS = PackRecycler()
