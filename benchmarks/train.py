"""Training throughput of GRU4Rec on the Diginetica train split (43,097 items).

Two settings, a fixed number of steps each (after a short warm-up):
(a) 100 units, batch 32, 2048 samples, cross-entropy + logQ, shared embedding;
(b) the published Diginetica setting as ``configs/diginetica.yaml`` has it (BPR-max, 512 units,
    batch 128, dropout 0.5/0.3, lr 0.05, momentum 0.15, 2048 samples, alpha 0.3, bpreg 0.9,
    ELU 1), read from that file, with fp32 products and (a)'s sample store.
Without ../shared/data, a synthetic log of the same catalogue size stands in (said in the note).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import torch

from benchmarks.measure import peak_gpu_mib
from recsys.config import (
    Config,
    ModelConfig,
    PreparationConfig,
    SourceConfig,
    TrainConfig,
    load_config,
)
from recsys.data.batching import SessionArrays, session_arrays
from recsys.data.preparation import PreparedDataset, prepare_events
from recsys.data.sources import read_events
from recsys.data.synthetic import SyntheticConfig
from recsys.model.artifact import TrainedModel
from recsys.model.gru4rec import GRU4Rec
from recsys.training.trainer import Trainer, item_support, resolve_device

ROOT = Path(__file__).resolve().parent.parent
DIGINETICA_CONFIG = ROOT / "configs" / "diginetica.yaml"
SAMPLE_STORE = 2_000_000  # negatives drawn ahead: the same store for every setting
SETTING_B = "b: Diginetica BPR-max, 512 units, batch 128"


def diginetica_config(overrides: dict[str, Any] | None = None) -> Config:
    """``configs/diginetica.yaml`` with a benchmark's ``overrides``; its log path is resolved
    against the project folder (where ``make`` runs it), so any working directory reads it."""
    log = load_config(DIGINETICA_CONFIG).data.source.paths[0]
    overrides = {"data.source.path": str(ROOT / log), **(overrides or {})}
    return load_config(DIGINETICA_CONFIG, overrides)


def settings() -> dict[str, tuple[ModelConfig, TrainConfig]]:
    """The training settings, by row name; (b) and its variants come from the Diginetica config.

    (b) takes fp32 products (the config's ``auto`` would differ between machines) and the
    benchmark's sample store; (a+) and (b+) add the repeat readout; (a lstm) and (a rnn) swap
    the cell; (b') changes only the products to bf16, (b'') also swaps the native kernels for
    torch ops (what they give, in the same run).
    """
    b = diginetica_config({"train.matmul": "fp32", "train.sample_store_size": SAMPLE_STORE})
    a_train = TrainConfig(
        loss="cross-entropy",
        batch_size=32,
        n_sample=2048,
        sample_alpha=0.5,
        logq=1.0,
        learning_rate=0.1,
        sample_store_size=SAMPLE_STORE,
    )
    readout = {"readout": "repeat"}  # the rows "+ readout": the 15 % budget, same run
    return {
        "a: 100 units, batch 32, XE+logQ": (
            ModelConfig(layers=[100], embedding="shared"),
            a_train,
        ),
        "a+: (a) with the repeat readout": (
            ModelConfig(layers=[100], embedding="shared", **readout),
            a_train,
        ),
        # model.cell (recsys/model/cells.py): the floors are LSTM >= 0.7x and RNN
        # >= 0.9x (a)'s events/s, measured in the same run
        "a lstm: (a) with model.cell lstm": (
            ModelConfig(layers=[100], embedding="shared", cell="lstm"),
            a_train,
        ),
        "a rnn: (a) with model.cell rnn": (
            ModelConfig(layers=[100], embedding="shared", cell="rnn"),
            a_train,
        ),
        SETTING_B: (b.model, b.train),
        "b+: (b) with the repeat readout": (b.model.model_copy(update=readout), b.train),
        "b': the same with bf16 products": (
            b.model,
            b.train.model_copy(update={"matmul": "bf16"}),
        ),
        "b'': (b') with torch ops, no native kernels": (
            b.model,
            b.train.model_copy(update={"matmul": "bf16", "kernels": "torch"}),
        ),
    }


def load_train() -> tuple[PreparedDataset, str]:
    config = diginetica_config()
    log = config.data.source.paths[0]
    if log.exists():
        data = prepare_events(read_events(config.data.source), config.data.preparation, str(log))
        return data, "Diginetica train split"
    synth = SyntheticConfig(n_items=43_097, n_sessions=190_000)
    source = SourceConfig(format="synthetic", synthetic=synth)
    return prepare_events(
        read_events(source), PreparationConfig(), "synthetic"
    ), "synthetic stand-in"


def warm_trainer(
    data: pl.DataFrame,
    n_items: int,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    device: str = "cpu",
) -> tuple[Trainer, SessionArrays]:
    """A trainer after a 20-step warm-up run that also fills the negative-sample store (and, on
    a GPU, loads the kernels), and the sessions it trains on."""
    torch.manual_seed(0)
    arrays = session_arrays(data)
    where = resolve_device(device)
    model = GRU4Rec(n_items, model_cfg, seed=0).to(where)
    warm_up = train_cfg.model_copy(update={"max_steps": 20, "device": device})
    trainer = Trainer(model, warm_up, item_support(data, n_items), where)
    trainer.run_epoch(arrays, epoch=0)
    return trainer, arrays


def train_steps(
    data: pl.DataFrame,
    n_items: int,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    steps: int,
    device: str = "cpu",
) -> tuple[dict[str, Any], GRU4Rec]:
    """Events/s of ``steps`` steps of the real epoch loop after ``warm_trainer``'s warm-up; also
    the model it trained (on the CPU)."""
    trainer, arrays = warm_trainer(data, n_items, model_cfg, train_cfg, device)
    model, where = trainer.model, trainer.device
    trainer.config = trainer.config.model_copy(update={"max_steps": steps})
    if where.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    record = trainer.run_epoch(arrays, epoch=0)  # ends by reading the losses back: synchronised
    result = {
        "events_per_s": round(record["events_per_second"]),
        "seconds": round(record["seconds"], 2),
        "steps": record["steps"],
        "kernels": record["kernels"],
    }
    if where.type == "cuda":
        result["peak_gpu_mib"] = peak_gpu_mib()
    return result, model.cpu().eval()


BRIEF_STEPS = 1000


def bench_model(dataset: PreparedDataset) -> tuple[GRU4Rec, str]:
    """The model the evaluation and serving benchmarks score with, and how it was made.

    Their speed depends on the trained score structure (how often the certified low-precision
    pass settles a row), so an untrained network would mislead. The Diginetica model of
    ``make pipeline CONFIG=configs/diginetica.yaml`` when present (and of this catalogue), else
    setting (b) trained for ``BRIEF_STEPS`` steps (~25 s).
    """
    trained = ROOT / diginetica_config().model_file  # what that pipeline writes (from ROOT)
    if trained.exists():
        model = TrainedModel.load(trained).network
        if model.n_items == dataset.n_items:
            return model, f"trained model ({trained})"
    model_cfg, train_cfg = settings()[SETTING_B]
    _, model = train_steps(dataset.train, dataset.n_items, model_cfg, train_cfg, BRIEF_STEPS)
    return model, f"512-unit model trained {BRIEF_STEPS} steps of setting (b)"


def bench_train(quick: bool, device: str = "cpu") -> list[dict[str, Any]]:
    dataset, origin = load_train()
    where = resolve_device(device)
    on = f"{torch.get_num_threads()} threads" if where.type == "cpu" else "GPU"
    rows = []
    for name, (model_cfg, train_cfg) in settings().items():
        steps = 100 if quick else 600
        result, _ = train_steps(dataset.train, dataset.n_items, model_cfg, train_cfg, steps, device)
        kernels = result.pop("kernels")
        rows.append(
            {
                "case": f"train {name}",
                **result,
                "note": f"{origin}, {dataset.n_items:,} items, {on}, {kernels} kernels",
            }
        )
    return rows
