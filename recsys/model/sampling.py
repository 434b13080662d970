"""Shared negative samples drawn ∝ popularity^alpha from a precomputed store.

Drawing thousands of samples per step one call at a time is slow; GRU4Rec draws a large store
at once (inverse CDF by binary search) and hands out one row per step, refilling when empty.
"""

from __future__ import annotations

import torch


class SampleStore:
    """Hands out ``n_sample`` item indices per step, ∝ ``support ** alpha``."""

    def __init__(
        self,
        support: torch.Tensor,
        n_sample: int,
        alpha: float,
        store_size: int,
        generator: torch.Generator,
        device: torch.device | str = "cpu",
    ) -> None:
        self.n_sample = n_sample
        weights = support.to(torch.float64).clamp_min(0) ** alpha
        self.cdf = (torch.cumsum(weights, 0) / weights.sum()).to(device)
        self.probs = (weights / weights.sum()).to(torch.float32)
        self.generator = generator
        self.device = torch.device(device)
        self.rows = max(1, store_size // n_sample) if n_sample else 0
        self._store = torch.empty(0, n_sample, dtype=torch.int64, device=self.device)
        self._next = 0

    def _refill(self) -> None:
        u = torch.rand(self.rows * self.n_sample, generator=self.generator, dtype=torch.float64)
        idx = torch.searchsorted(self.cdf, u.to(self.device), right=True)
        idx.clamp_(max=len(self.cdf) - 1)
        self._store = idx.view(self.rows, self.n_sample)
        self._next = 0

    def draw(self) -> torch.Tensor:
        """(n_sample,) int64 item indices for one step."""
        if self.n_sample == 0:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        if self._next >= len(self._store):
            self._refill()
        row = self._store[self._next]
        self._next += 1
        return row

    def state(self) -> dict[str, torch.Tensor | int]:
        """What a checkpoint needs to continue the exact same sample sequence."""
        return {"store": self._store.cpu(), "next": self._next}

    def load_state(self, state: dict[str, torch.Tensor | int]) -> None:
        store = state["store"]
        assert isinstance(store, torch.Tensor)
        self._store = store.to(self.device)
        self._next = int(state["next"])
