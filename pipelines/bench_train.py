"""Training throughput of GRU4Rec on the Diginetica train split (43,097 items).

Two settings, a fixed number of steps each (after a short warm-up):
(a) 100 units, batch 32, 2048 samples, cross-entropy + logQ, shared embedding;
(b) the published Diginetica setting: BPR-max, 512 units, batch 128, dropout 0.5/0.3,
    lr 0.05, momentum 0.15, 2048 samples, alpha 0.3, bpreg 0.9, ELU 1.
Without ../shared/data, a synthetic log of the same catalogue size stands in (said in the note).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import torch

from pipelines.bench import peak_gpu_mib
from recsys.config import ModelConfig, PreparationConfig, SourceConfig, TrainConfig
from recsys.data.batching import session_arrays
from recsys.data.preparation import PreparedDataset, prepare_events
from recsys.data.sources import read_events
from recsys.data.synthetic import SyntheticConfig
from recsys.model.gru4rec import GRU4Rec
from recsys.training.trainer import Trainer, item_support, resolve_device

DIGINETICA = (
    Path(__file__).resolve().parent.parent.parent / "shared/data/diginetica/diginetica_sessions.tsv"
)

SETTINGS: dict[str, tuple[ModelConfig, TrainConfig]] = {
    "a: 100 units, batch 32, XE+logQ": (
        ModelConfig(layers=[100], embedding="shared"),
        TrainConfig(
            loss="cross-entropy",
            batch_size=32,
            n_sample=2048,
            sample_alpha=0.5,
            logq=1.0,
            learning_rate=0.1,
            sample_store_size=2_000_000,
        ),
    ),
    "b: Diginetica BPR-max, 512 units, batch 128": (
        ModelConfig(layers=[512], embedding="shared", dropout_embed=0.5, dropout_hidden=0.3),
        TrainConfig(
            loss="bpr-max",
            batch_size=128,
            learning_rate=0.05,
            momentum=0.15,
            n_sample=2048,
            sample_alpha=0.3,
            bpreg=0.9,
            elu_param=1.0,
            sample_store_size=2_000_000,
        ),
    ),
}
# (b) with the step's matrix products in bf16 (``train.matmul: bf16``), everything else equal;
# then the same with torch ops instead of the native kernels (what they give, in the same run)
_B = SETTINGS["b: Diginetica BPR-max, 512 units, batch 128"]
SETTINGS["b': the same with bf16 products"] = (_B[0], _B[1].model_copy(update={"matmul": "bf16"}))
SETTINGS["b'': (b') with torch ops, no native kernels"] = (
    _B[0],
    _B[1].model_copy(update={"matmul": "bf16", "kernels": "torch"}),
)


def load_train() -> tuple[PreparedDataset, str]:
    if DIGINETICA.exists():
        source = SourceConfig(format="srgnn_tsv", path=DIGINETICA)
        prep = PreparationConfig(dedup_consecutive=False, min_item_support=1, split="given")
        return prepare_events(read_events(source), prep, str(DIGINETICA)), "Diginetica train split"
    synth = SyntheticConfig(n_items=43_097, n_sessions=190_000)
    source = SourceConfig(format="synthetic", synthetic=synth)
    return prepare_events(
        read_events(source), PreparationConfig(), "synthetic"
    ), "synthetic stand-in"


def train_steps(
    data: pl.DataFrame,
    n_items: int,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    steps: int,
    device: str = "cpu",
) -> tuple[dict[str, Any], GRU4Rec]:
    """Events/s of ``steps`` steps of the real epoch loop, after a 20-step warm-up run that also
    fills the negative-sample store (and, on a GPU, loads the kernels); also the model it
    trained (on the CPU)."""
    torch.manual_seed(0)
    arrays = session_arrays(data)
    where = resolve_device(device)
    model = GRU4Rec(n_items, model_cfg, seed=0).to(where)
    warm_up = train_cfg.model_copy(update={"max_steps": 20, "device": device})
    trainer = Trainer(model, warm_up, item_support(data, n_items), where)
    trainer.run_epoch(arrays, epoch=0)
    trainer.config = warm_up.model_copy(update={"max_steps": steps})
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


TRAINED = Path(
    "data/diginetica/model/model.pt"
)  # what `make pipeline CONFIG=configs/diginetica.yaml` writes
BRIEF_STEPS = 1000


def bench_model(dataset: PreparedDataset) -> tuple[GRU4Rec, str]:
    """The model the evaluation and serving benchmarks score with, and how it was made.

    Their speed depends on the trained score structure (how often the certified low-precision
    pass settles a row), so an untrained network would mislead. The Diginetica model of
    ``make pipeline CONFIG=configs/diginetica.yaml`` when present (and of this catalogue), else
    setting (b) trained for ``BRIEF_STEPS`` steps (~25 s).
    """
    if TRAINED.exists():
        model, _ = GRU4Rec.load(TRAINED)
        if model.n_items == dataset.n_items:
            return model, f"trained model ({TRAINED})"
    model_cfg, train_cfg = SETTINGS["b: Diginetica BPR-max, 512 units, batch 128"]
    _, model = train_steps(dataset.train, dataset.n_items, model_cfg, train_cfg, BRIEF_STEPS)
    return model, f"512-unit model trained {BRIEF_STEPS} steps of setting (b)"


def bench_train(quick: bool, device: str = "cpu") -> list[dict[str, Any]]:
    dataset, origin = load_train()
    where = resolve_device(device)
    on = f"{torch.get_num_threads()} threads" if where.type == "cpu" else "GPU"
    rows = []
    for name, (model_cfg, train_cfg) in SETTINGS.items():
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
