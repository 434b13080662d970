"""Training behaviour: it learns, it is reproducible, it resumes exactly, it fails clearly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch

from pipelines.prepare import prepare
from recsys.config import ModelConfig, config_from_dict
from recsys.core.errors import RecsysError
from recsys.data.preparation import load_prepared
from recsys.evaluation.gru4rec import GRU4RecScorer
from recsys.evaluation.harness import evaluate
from recsys.training.trainer import Trainer, train_gru4rec
from tests.conftest import run_cli, shared_path, tiny_config
from tests.helpers import deterministic_log, resumed_after_interrupt, small_train_config


@pytest.mark.parametrize("loss", ["cross-entropy", "bpr-max", "top1-max"])
def test_learns_deterministic_transitions(loss: str) -> None:
    log = deterministic_log()
    train = log.filter(pl.col("session_id") < 500)
    test = log.filter(pl.col("session_id") >= 500)
    cfg = small_train_config(
        epochs=8, loss=loss, logq=1.0 if loss == "cross-entropy" else 0.0, elu_param=0.5
    )
    result = train_gru4rec(train, 30, ModelConfig(layers=[32]), cfg)
    rec = GRU4RecScorer(result.model)
    metrics = evaluate(rec, test, cutoffs=[1], show_progress=False).metrics
    assert metrics["recall@1"] > 0.9, metrics


@pytest.mark.parametrize("embedding", ["shared", "separate", "none"])
def test_bf16_products_learn_deterministic_transitions(embedding: str) -> None:
    """``train.matmul: bf16`` (bf16 operands for the step's products) still learns, with
    dropout on, in every embedding mode."""
    log = deterministic_log()
    train = log.filter(pl.col("session_id") < 500)
    test = log.filter(pl.col("session_id") >= 500)
    cfg = small_train_config(epochs=8, loss="bpr-max", elu_param=0.5, matmul="bf16")
    model_cfg = ModelConfig(layers=[32], embedding=embedding, dropout_embed=0.1)
    result = train_gru4rec(train, 30, model_cfg, cfg)
    rec = GRU4RecScorer(result.model)
    metrics = evaluate(rec, test, cutoffs=[1], show_progress=False).metrics
    assert metrics["recall@1"] > 0.9, metrics


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    log = deterministic_log()
    cfg = small_train_config()
    model_cfg = ModelConfig(layers=[16], dropout_hidden=0.3)
    a = train_gru4rec(log, 30, model_cfg, cfg).model.state_dict()
    b = train_gru4rec(log, 30, model_cfg, cfg).model.state_dict()
    c = train_gru4rec(log, 30, model_cfg, small_train_config(seed=7)).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("bptt", [1, 3])
def test_resume_after_interrupt_equals_uninterrupted(tmp_path: Path, bptt: int) -> None:
    log = deterministic_log()
    model_cfg = ModelConfig(layers=[16], dropout_hidden=0.2, dropout_embed=0.1)
    cfg = small_train_config(epochs=3, momentum=0.2, bptt=bptt)
    straight = train_gru4rec(log, 30, model_cfg, cfg).model.state_dict()

    resumed = resumed_after_interrupt(train_gru4rec, tmp_path / "ckpt", 2, log, 30, model_cfg, cfg)
    assert resumed.resumed_from == 2
    assert len(resumed.history) == 3
    assert all(torch.equal(straight[k], resumed.model.state_dict()[k]) for k in straight)


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path: Path) -> None:
    log = deterministic_log()
    train_gru4rec(log, 30, ModelConfig(layers=[8]), small_train_config(), checkpoint_dir=tmp_path)
    with pytest.raises(RecsysError, match="another config"):
        train_gru4rec(
            log,
            30,
            ModelConfig(layers=[9]),
            small_train_config(),
            checkpoint_dir=tmp_path,
            resume=True,
        )


@pytest.mark.parametrize("batch_size", [1, 3, 500])
def test_any_batch_size_against_few_sessions(batch_size: int) -> None:
    log = deterministic_log(n_sessions=3)
    result = train_gru4rec(
        log, 30, ModelConfig(layers=[8]), small_train_config(batch_size=batch_size)
    )
    assert result.history[0]["events"] == log.height - 3


def _slots_by_hand(lengths: list[int], batch_size: int) -> tuple[int, int]:
    """(events, steps) of session-parallel batching until fewer than two slots are left.

    Each slot trains one event (input, target) of its session per step; a finished session's
    slot takes the next waiting session, or closes when none waits.
    """
    waiting = [n - 1 for n in lengths]  # events left in each session, in start order
    slots, waiting = waiting[:batch_size], waiting[batch_size:]
    events = steps = 0
    while len(slots) >= 2:
        events += len(slots)
        steps += 1
        left = []
        for n in slots:
            if n > 1:
                left.append(n - 1)
            elif waiting:
                left.append(waiting.pop(0))
        slots = left
    return events, steps


def test_no_extra_samples_and_a_single_session_still_trains() -> None:
    """With ``n_sample: 0`` a target's only negatives are the other sessions' targets: training
    runs every step that has two sessions or more, and stops cleanly once one is left alone."""
    log = deterministic_log(n_sessions=5)
    lengths = log.group_by("session_id", maintain_order=True).len()["len"].to_list()
    events, steps = _slots_by_hand(lengths, batch_size=4)
    assert 0 < events < log.height - len(lengths)  # the lone session's tail is really left out
    result = train_gru4rec(
        log, 30, ModelConfig(layers=[8]), small_train_config(n_sample=0, batch_size=4)
    )
    assert (result.history[0]["events"], result.history[0]["steps"]) == (events, steps)


def test_diverging_loss_stops_with_a_clear_message() -> None:
    log = deterministic_log()
    cfg = small_train_config(learning_rate=1e30, loss="bpr-max", epochs=3)
    with pytest.raises(RecsysError, match="training diverged"):
        train_gru4rec(log, 30, ModelConfig(layers=[8]), cfg)


def test_divergence_is_reported_at_its_first_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Losses are read back in groups of steps; the message still names the first bad one."""
    real_step = Trainer.train_step
    calls = {"n": 0}

    def poisoned(self: Trainer, *args: Any) -> Any:
        loss, hidden = real_step(self, *args)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] in (7, 9) else loss), hidden

    monkeypatch.setattr(Trainer, "train_step", poisoned)
    log = deterministic_log()
    with pytest.raises(RecsysError, match=r"loss became nan in epoch 1, step 7;"):
        train_gru4rec(log, 30, ModelConfig(layers=[8]), small_train_config())


def test_loss_goes_down_on_a_real_log(tmp_path: Path) -> None:
    train_file = shared_path("yoochoose-rsc15-100k", "yoochoose-clicks-100k_train_full.txt")
    raw = tiny_config(tmp_path)
    raw["data"] = {
        "source": {"format": "gru4rec_tsv", "path": str(train_file)},
        "preparation": {"dedup_consecutive": False, "test_days": 1},
    }
    config = config_from_dict(raw)
    prepare(config)
    data = load_prepared(config.prepared_dir)
    cfg = small_train_config(epochs=3, batch_size=32, n_sample=128, logq=1.0)
    history = train_gru4rec(data.train, data.n_items, ModelConfig(layers=[48]), cfg).history
    losses = [h["loss"] for h in history]
    assert losses[-1] < losses[0] * 0.95, losses


def test_early_stopping_tunes_on_valid_then_refits_on_train(tmp_path: Path) -> None:
    from pipelines.train import read_meta, run_train

    raw = tiny_config(
        tmp_path, train={"epochs": 4, "early_stopping": {"patience": 1, "metric": "mrr@20"}}
    )
    config = config_from_dict(raw)
    prepare(config)
    meta = run_train(config, tracker=None)
    tune = [h for h in meta["history"] if h["phase"] == "tune"]
    fit = [h for h in meta["history"] if h["phase"] == "fit"]
    assert tune and all("valid_metric" in h for h in tune)
    best = max(range(len(tune)), key=lambda i: tune[i]["valid_metric"]) + 1
    assert meta["epochs"] == best == len(fit)
    assert (
        len(tune) == len(fit) + 1 or len(tune) == 4
    )  # stopped one epoch after the best, or ran out
    assert read_meta(config) == meta


def test_validation_between_epochs_never_ranks_with_stale_weights() -> None:
    """The fast ranking caches low-precision copies of the item matrix; every epoch's update must
    invalidate them, or early stopping would rank validation events with last epoch's items."""
    import copy

    clean = deterministic_log(n_items=300, n_sessions=900)
    rng = np.random.default_rng(1)
    noisy = pl.Series(rng.random(clean.height) < 0.5)  # half the clicks random: metrics move
    random_items = pl.Series(rng.integers(0, 300, clean.height))
    log = clean.with_columns(
        pl.when(noisy).then(random_items).otherwise(pl.col("item_idx")).alias("item_idx")
    )
    train = log.filter(pl.col("session_id") < 800)
    valid = log.filter(pl.col("session_id") >= 800)
    seen: list[tuple[float, float]] = []

    def validate(model: Any) -> float:
        live = GRU4RecScorer(model)
        live.fast_ranking = True  # cached on the training model across epochs
        fresh = GRU4RecScorer(copy.deepcopy(model))
        fresh.fast_ranking = False  # full fp32 scoring of this epoch's weights
        got = evaluate(live, valid, show_progress=False).metrics["mrr@20"]
        seen.append((got, evaluate(fresh, valid, show_progress=False).metrics["mrr@20"]))
        return got

    train_gru4rec(
        train, 300, ModelConfig(layers=[32]), small_train_config(epochs=3), validate=validate
    )
    assert len(seen) == 3
    assert all(got == expected for got, expected in seen), seen
    assert len({got for got, _ in seen}) == 3  # the model did change between epochs


def test_a_device_that_is_missing_or_wrong_for_a_benchmark_is_one_clear_error() -> None:
    """``recsys bench --device cuda`` never prints a CPU number under a GPU label, nor a traceback."""
    if torch.cuda.is_available():
        result = run_cli("bench", "--only", "serve", "--device", "cuda", timeout=120)
        expected = "run on the CPU only; --device cuda applies to accuracy, train"
    else:
        result = run_cli("bench", "--device", "cuda", timeout=120)
        expected = "error: --device is 'cuda' but no CUDA device is available"
    assert result.returncode == 1, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


FAULTS_SCRIPT = """
import resource, sys
import torch
from recsys.training.allocator import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
rounds = []
for _ in range(5):  # the quietest of 5 rounds of 20 steps: a fault storm is in every round
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        torch.ones(2_000_000).sum()  # 8 MB temporaries, as a training step makes them
    rounds.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
print(min(rounds))
"""


@pytest.mark.skipif(
    __import__("platform").libc_ver()[0] != "glibc", reason="the fix is for glibc's malloc"
)
def test_training_keeps_freed_memory_instead_of_faulting_it_in_again() -> None:
    """glibc in the state ``make pipeline`` ran into (temporaries mapped fresh and trimmed at
    every free) faults each 8 MB temporary in page by page; after ``retain_freed_memory`` (which
    the trainer calls on a CPU) they reuse the process's pages."""
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    faults = {}
    for mode in ("default", "retain"):
        out = subprocess.run(
            [sys.executable, "-c", FAULTS_SCRIPT, mode],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        faults[mode] = float(out.stdout.strip())
    assert faults["default"] > 1000  # ~1 fault per 4 KB page of each temporary
    assert faults["retain"] < faults["default"] / 10, faults
