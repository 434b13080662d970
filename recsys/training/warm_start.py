"""Warm starts: yesterday's model and optimiser state, mapped onto today's item index.

A daily update continues from the last model instead of training from scratch. The item rows
are matched by raw id, never by position: a known item keeps its output row, bias, input row
and its Adagrad accumulator and momentum; an item the base never saw gets a fresh row (the
initialisation of a new model of today's size), a zero bias and zero optimiser state; an item
that no longer occurs keeps its row (callers decide whether it stays in the index). The dense
GRU weights and their optimiser state carry over unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from recsys.config import ModelConfig
from recsys.core.errors import RecsysError
from recsys.model.gru4rec import GRU4Rec
from recsys.model.optimizer import RowAdagradM

OptimizerState = dict[str, dict[str, torch.Tensor]]

ROW_PARAMETERS = ("item_out", "item_bias", "item_in")  # per-item rows, remapped by raw id
# what a warm start cannot change: the shapes and meaning of the dense weights
STRUCTURE = ("cell", "layers", "embedding", "embedding_dim", "readout", "repeat_window")


@dataclass(frozen=True)
class WarmStart:
    """What ``train_gru4rec`` starts from instead of a fresh model: the network's state and the
    optimiser's (for today's index), the sampler's popularity, and a key for checkpoints."""

    state: dict[str, torch.Tensor]
    optimizer: OptimizerState
    support: torch.Tensor
    key: str
    new_items: int

    def apply(self, model: GRU4Rec, optimizer: RowAdagradM, device: torch.device) -> None:
        """Load the state into a freshly built model and its optimiser (on ``device``)."""
        model.load_state_dict(self.state)
        optimizer.load_state_dict(state_on(self.optimizer, device))


def state_on(state: OptimizerState, device: torch.device) -> OptimizerState:
    """The optimiser's state dict with every tensor on ``device`` (the file keeps CPU ones)."""
    return {kind: {n: t.to(device) for n, t in part.items()} for kind, part in state.items()}


def check_compatible(base: ModelConfig, today: ModelConfig, base_name: str) -> None:
    """One clear error when the base model's network differs from the config's."""
    for name in STRUCTURE:
        old, new = getattr(base, name, None), getattr(today, name, None)
        if old != new:
            raise RecsysError(
                f"warm start from {base_name}: the base model has model.{name} = {old!r} but "
                f"the config has {new!r}; a warm start needs the same network (train cold, "
                f"or set model.{name}: {old!r})"
            )


def merged_ids(base_ids: Sequence[Any], today_ids: Sequence[Any]) -> list[Any]:
    """Today's ids in their order, then the base's ids that no longer occur (their rows kept)."""
    today_set = set(today_ids)
    return [*today_ids, *(i for i in base_ids if i not in today_set)]


def row_mapping(base_ids: Sequence[Any], ids: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows in the new index, their rows in the base) for every id both know, by raw id."""
    where = {raw: i for i, raw in enumerate(base_ids)}
    pairs = [(i, where[raw]) for i, raw in enumerate(ids) if raw in where]
    if not pairs:
        return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    new, old = zip(*pairs, strict=True)
    return torch.tensor(new, dtype=torch.long), torch.tensor(old, dtype=torch.long)


def _remap_rows(
    fresh: torch.Tensor, base: torch.Tensor, new: torch.Tensor, old: torch.Tensor
) -> torch.Tensor:
    out = fresh.clone()
    out[new] = base[old].to(out.dtype)
    return out


def _remap_optimizer(
    optimizer: OptimizerState | None,
    shapes: dict[str, torch.Size],
    new: torch.Tensor,
    old: torch.Tensor,
    momentum: float,
) -> OptimizerState:
    """Accumulators and velocities for today's rows (zeros for new items); the slots follow
    today's momentum (a base trained without momentum starts today's velocity at zero)."""
    slots = 2 if momentum > 0 else 1
    state = optimizer or {"acc": {}, "vel": {}, "rows": {}}
    rows: dict[str, torch.Tensor] = {}
    for name, per_row in state.get("rows", {}).items():
        if name not in shapes:
            continue
        fresh = torch.zeros((shapes[name][0], slots, *shapes[name][1:]), dtype=per_row.dtype)
        kept = per_row[:, :slots]
        fresh[new, : kept.shape[1]] = kept[old]
        rows[name] = fresh
    # copies: the optimiser updates them in place, and the base model's state must not change
    acc = {n: a.clone() for n, a in state.get("acc", {}).items()}
    vel = {n: state.get("vel", {}).get(n, torch.zeros_like(a)).clone() for n, a in acc.items()}
    return {"acc": acc, "vel": vel if momentum > 0 else {}, "rows": rows}


def warm_start(
    base: GRU4Rec,
    base_ids: Sequence[Any],
    base_support: Sequence[float],
    optimizer: OptimizerState | None,
    ids: Sequence[Any],
    window_support: torch.Tensor,
    config: ModelConfig,
    momentum: float,
    seed: int,
    key: str,
) -> WarmStart:
    """The base model's state for the index ``ids``. Fresh rows are drawn by a new model of
    ``len(ids)`` items with the run's seed, as a cold start would draw them; the sampler's
    popularity is the base's support plus the window's clicks (an old item keeps its weight,
    a new one has only today's)."""
    fresh = GRU4Rec(len(ids), config, seed=seed).state_dict()
    new, old = row_mapping(base_ids, ids)
    state: dict[str, torch.Tensor] = {}
    for name, value in base.state_dict().items():
        if name in ROW_PARAMETERS:
            state[name] = _remap_rows(fresh[name], value.detach().cpu(), new, old)
        else:
            state[name] = value.detach().cpu().clone()
    shapes = {n: state[n].shape for n in ROW_PARAMETERS if n in state}
    support = window_support.to(torch.float64).clone()
    support[new] += torch.tensor(list(base_support), dtype=torch.float64)[old]
    return WarmStart(
        state=state,
        optimizer=_remap_optimizer(optimizer, shapes, new, old, momentum),
        support=support,
        key=key,
        new_items=len(ids) - len(new),
    )
