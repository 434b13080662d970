"""Session-parallel mini-batches against a naive per-session loop."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys.data.batching import SessionArrays, session_arrays, session_parallel_batches
from recsys.training.trainer import reset_slots


def make_arrays(lengths: list[int], seed: int = 0) -> SessionArrays:
    rng = np.random.default_rng(seed)
    items = rng.integers(0, 50, size=sum(lengths)).astype(np.int64)
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    return SessionArrays(items, offsets)


def replay(data: SessionArrays, batch_size: int) -> dict[int, list[tuple[int, int]]]:
    """Follow each slot through the steps and collect the (input, target) pairs per session."""
    slots: list[int] = []  # slot -> session number
    next_session = 0
    pairs: dict[int, list[tuple[int, int]]] = {}
    lengths = np.diff(data.offsets)
    eligible = [k for k in range(data.n_sessions) if lengths[k] >= 2]
    for step in session_parallel_batches(data, batch_size):
        if step.keep is not None:
            slots = [slots[i] for i in step.keep]
        for slot in np.flatnonzero(step.reset):
            if slot < len(slots):
                slots[slot] = eligible[next_session]
            else:
                slots.append(eligible[next_session])
            next_session += 1
        assert len(slots) == len(step.inputs)
        for slot, session in enumerate(slots):
            pairs.setdefault(session, []).append((int(step.inputs[slot]), int(step.targets[slot])))
    return pairs


def naive_pairs(data: SessionArrays) -> dict[int, list[tuple[int, int]]]:
    out = {}
    for k in range(data.n_sessions):
        s = data.session(k)
        if len(s) >= 2:
            out[k] = [(int(a), int(b)) for a, b in zip(s[:-1], s[1:], strict=True)]
    return out


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=1, max_value=12), min_size=1, max_size=40),
    batch_size=st.integers(min_value=1, max_value=50),
    seed=st.integers(0, 1000),
)
def test_batches_yield_every_sessions_pairs_in_order(
    lengths: list[int], batch_size: int, seed: int
) -> None:
    data = make_arrays(lengths, seed)
    assert replay(data, batch_size) == naive_pairs(data)


def test_a_session_longer_than_all_others_together_is_read_to_its_end() -> None:
    data = make_arrays([2, 2, 3, 60, 2, 2], seed=1)
    assert replay(data, batch_size=3) == naive_pairs(data)
    steps = list(session_parallel_batches(data, 3))
    assert len(steps[-1].inputs) == 1  # the batch shrank to the long session alone


def test_fewer_sessions_than_slots() -> None:
    data = make_arrays([3, 2], seed=2)
    steps = list(session_parallel_batches(data, batch_size=64))
    assert len(steps[0].inputs) == 2
    assert replay(data, 64) == naive_pairs(data)


def test_no_session_long_enough_yields_nothing() -> None:
    assert list(session_parallel_batches(make_arrays([1, 1, 1]), 4)) == []


def test_reset_zeroes_only_the_slots_that_start_a_session() -> None:
    data = make_arrays([2, 5, 3, 4], seed=3)
    hidden = [torch.ones(2, 4)]
    seen_reset = False
    for step in session_parallel_batches(data, batch_size=2):
        if step.keep is not None:
            hidden = [h[torch.from_numpy(step.keep)] for h in hidden]
        before = hidden[0].clone()
        hidden = reset_slots(hidden, step.reset, torch.device("cpu"))
        for slot, is_new in enumerate(step.reset):
            if is_new:
                assert torch.all(hidden[0][slot] == 0)
                seen_reset = True
            else:
                assert torch.equal(hidden[0][slot], before[slot])
        hidden = [h + 1.0 for h in hidden]  # what a GRU step would do: change every slot
    assert seen_reset


def test_session_arrays_from_events_keep_order() -> None:
    events = pl.DataFrame({"session_id": [7, 7, 7, 3, 3], "item_idx": [4, 2, 9, 1, 0]})
    arrays = session_arrays(events)
    assert [s.tolist() for s in arrays.sessions()] == [[4, 2, 9], [1, 0]]
    assert arrays.n_events == 3


@pytest.mark.parametrize("batch_size", [1, 7, 1000])
def test_event_count_matches_any_batch_size(batch_size: int) -> None:
    data = make_arrays([2, 3, 1, 8, 4, 2, 2], seed=4)
    assert sum(len(s.targets) for s in session_parallel_batches(data, batch_size)) == data.n_events
