"""Preparation in bounded memory (recsys/data/streaming.py) writes the in-memory path's files.

The shipped logs are prepared both ways, the streaming path with parts small enough that every
log is cut into several (so the cross-part steps are exercised: item counts, item sets, the
ordering by session start across parts), and the files are compared byte for byte.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks import scale
from benchmarks.prepare import log_config
from benchmarks.train import settings, train_steps
from pipelines.prepare import prepare
from recsys.config import load_config
from recsys.core.errors import RecsysError
from recsys.data.preparation import load_prepared, prepare_events, write_prepared
from recsys.data.schema import ITEMS_FILE, SPLITS, STATS_FILE, split_file
from recsys.data.sources import read_events
from recsys.data.streaming import prepare_streaming, resolve_engine
from recsys.model.gru4rec import GRU4Rec
from tests.conftest import ROOT, shared_path, tiny_config, write_config

FILES = [*(split_file(s) for s in SPLITS), ITEMS_FILE, STATS_FILE]


@pytest.mark.parametrize(
    ("config", "log", "bucket_events"),
    [
        # time split, no de-dup, 4 filter rounds; ~30k events in 4 parts
        ("yoochoose-100k", "yoochoose-rsc15-100k/yoochoose-clicks-100k_train_full.txt", 8_000),
        # time split with de-dup, raw Diginetica format
        ("diginetica-sample", "diginetica-sample/sample_train-item-views.csv", 3_000),
    ],
)
def test_streaming_writes_the_in_memory_files_byte_for_byte(
    tmp_path: Path, config: str, log: str, bucket_events: int
) -> None:
    shared_path(*log.split("/"))
    cfg = load_config(ROOT / "configs" / f"{config}.yaml")
    source, prep = cfg.data.source, cfg.data.preparation
    memory = write_prepared(prepare_events(read_events(source), prep, "log"), tmp_path / "m")
    streamed = prepare_streaming(
        read_events(source), prep, "log", tmp_path / "s", bucket_events=bucket_events
    )
    assert streamed["counts"]["after_cleaning"] > 2 * bucket_events  # several parts
    assert streamed == memory
    for name in FILES:
        assert (tmp_path / "s" / name).read_bytes() == (tmp_path / "m" / name).read_bytes(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "s"]  # no work folder left


def test_streaming_given_split_matches_memory(tmp_path: Path) -> None:
    """The SR-GNN split kept as given (valid = the last train sessions), in many parts."""
    data = tmp_path / "digi.tsv"
    full = shared_path("diginetica", "diginetica_sessions.tsv")
    lines = full.read_text().splitlines()
    data.write_text("\n".join(lines[:30_000] + lines[-8_000:]) + "\n")
    cfg = load_config(ROOT / "configs" / "diginetica.yaml", {"data.source.path": str(data)})
    source, prep = cfg.data.source, cfg.data.preparation
    memory = write_prepared(prepare_events(read_events(source), prep, "log"), tmp_path / "m")
    streamed = prepare_streaming(
        read_events(source), prep, "log", tmp_path / "s", bucket_events=2_000
    )
    assert streamed == memory
    for name in FILES:
        assert (tmp_path / "s" / name).read_bytes() == (tmp_path / "m" / name).read_bytes(), name


def test_streaming_refuses_a_log_filtered_away_in_one_line(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "configs" / "default.yaml")
    prep = cfg.data.preparation.model_copy(update={"min_item_support": 10**9})
    with pytest.raises(RecsysError, match="every event was filtered away") as err:
        prepare_streaming(
            read_events(cfg.data.source), prep, "log", tmp_path / "s", bucket_events=5_000
        )
    assert "\n" not in str(err.value)
    assert not (tmp_path / "s").exists() and list(tmp_path.iterdir()) == []


def test_auto_engine_streams_large_files_only(tmp_path: Path) -> None:
    small = tmp_path / "small.csv"
    small.write_text("a\n")
    assert resolve_engine("auto", [str(small)]) == "memory"
    assert resolve_engine("auto", []) == "memory"  # the synthetic source has no file
    big = tmp_path / "big.csv"
    with big.open("wb") as f:  # sparse: no disk used
        f.truncate(256 * 2**20)
    assert resolve_engine("auto", [str(big)]) == "streaming"
    assert resolve_engine("memory", [str(big)]) == "memory"


def test_prepare_step_with_engine_streaming_writes_the_memory_files(tmp_path: Path) -> None:
    """``data.preparation.engine: streaming`` through the prepare step (cache key, stats.json),
    against the in-memory files; a second run is up to date."""
    raw = tiny_config(tmp_path / "work")
    raw["data"]["preparation"]["engine"] = "streaming"
    cfg = load_config(write_config(tmp_path / "config.yaml", raw))
    stats, redone = prepare(cfg)
    assert redone and prepare(cfg)[1] is False
    memory = write_prepared(
        prepare_events(read_events(cfg.data.source), cfg.data.preparation, "log"), tmp_path / "m"
    )
    for name in (*(split_file(s) for s in SPLITS), ITEMS_FILE):
        assert (cfg.prepared_dir / name).read_bytes() == (tmp_path / "m" / name).read_bytes()
    assert stats["fingerprint"] == memory["fingerprint"]


def test_generated_power_law_log_with_many_items_prepares_and_trains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """benchmarks/scale.py's log, written in chunks, through the streaming path in parts, then
    a few training steps over its catalogue: the item rows the steps touch are updated."""
    monkeypatch.setattr(scale, "CHUNK_EVENTS", 40_000)
    log = tmp_path / "clicks.parquet"
    n_events = scale.write_log(log, 160_000, n_items=50_000)
    assert n_events > 150_000
    cfg = log_config(log, tmp_path / "work", "scale", "streaming")
    prep = cfg.data.preparation.model_copy(update={"min_item_support": 1})  # keep the tail
    stats = prepare_streaming(
        read_events(cfg.data.source),
        prep,
        "log",
        cfg.prepared_dir,
        bucket_events=40_000,
    )
    data = load_prepared(cfg.prepared_dir)
    assert stats["items"] == data.n_items > 10_000
    model_cfg, train_cfg = settings()["a: 100 units, batch 32, XE+logQ"]
    train_cfg = train_cfg.model_copy(update={"sample_store_size": 20_000, "kernels": "torch"})
    result, model = train_steps(data.train, data.n_items, model_cfg, train_cfg, 5)
    assert result["steps"] == 5 and model.n_items == data.n_items
    untouched = GRU4Rec(data.n_items, model_cfg, seed=0)
    changed = model.state_dict()["item_out"] != untouched.state_dict()["item_out"]
    assert 0 < int(changed.any(dim=1).sum()) < data.n_items
    assert torch.isfinite(model.state_dict()["item_out"]).all()
