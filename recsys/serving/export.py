"""``recsys export``: a model's scoring step as ONNX or TorchScript, for use outside Python.

The step is what a live click costs: ``(item, state) -> (new_state, scores)``, with ``item`` the
clicked item's index (int64, shape (B,)), ``state`` every layer's state side by side
(float32, (B, sum of the state sizes), zeros for a new session; an LSTM layer keeps [c, h],
``meta.json`` says the cell and the width) and ``scores`` the logits of the whole catalogue
(float32, (B, n_items)). The directory also holds ``items.json`` (the original id of
each index, and the most clicked ids for a session with no known item) and ``meta.json``.
The step is the network's own ``input_gates`` + ``infer_step`` + output product, so an exported
step computes what ``LiveSessions.click`` does. A model with the repeat readout is refused: its
bonus needs the session's item history, which this step does not carry.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from recsys.core.atomic import atomic_directory, write_json
from recsys.core.errors import RecsysError, first_line
from recsys.model.gru4rec import GRU4Rec
from recsys.serving.recommender import SessionRecommender

FILES = {"onnx": "scoring_step.onnx", "torchscript": "scoring_step.pt"}
POPULAR = 100  # popular ids written for the fallback
CHECK_TOLERANCE = 1e-5  # exported vs torch scores and states, on a probe, after writing
OPSET = 18


class ScoringStep(nn.Module):
    """One click for a batch of sessions: (item (B,), state (B, S)) -> (state (B, S), scores)."""

    def __init__(self, network: GRU4Rec) -> None:
        super().__init__()
        self.network = network.eval()
        self.sizes = list(network.state_sizes)  # per layer: H, or 2H ([c, h]) for an LSTM

    def forward(self, item: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = list(state.split(self.sizes, dim=1))
        out, new = self.network.infer_step(self.network.input_gates(item), hidden)
        scores = torch.addmm(self.network.item_bias, out, self.network.item_out.t())
        return torch.cat(new, dim=1), scores


def _probe(network: GRU4Rec, rows: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    items = torch.randint(0, network.n_items, (rows,), generator=gen)
    state = torch.randn(rows, sum(network.state_sizes), generator=gen) * 0.5
    return items, state


def export_model(rec: SessionRecommender, fmt: str, output: Path) -> Path:
    """Write the step, ``items.json`` and ``meta.json`` to ``output`` (replaced as a whole)."""
    if fmt not in FILES:
        raise RecsysError(f"unknown export format {fmt!r}; use one of {sorted(FILES)}")
    network = rec.model
    if network.readout is not None:
        raise RecsysError(
            "this model has the repeat readout (model.readout: repeat), whose bonus needs the "
            "session's item history; only the plain GRU4Rec step can be exported"
        )
    step = ScoringStep(network)
    with atomic_directory(output) as tmp:
        path = tmp / FILES[fmt]
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # exporters' deprecation and tracer notices
            if fmt == "onnx":
                _onnx(step, network, path)
            else:
                torch.jit.save(torch.jit.trace(step, _probe(network)), str(path))
        write_json(tmp / "items.json", _items(rec))
        write_json(tmp / "meta.json", _meta(rec, fmt))
        check_export(step, fmt, path)
    return output / FILES[fmt]


def _onnx(step: ScoringStep, network: GRU4Rec, path: Path) -> None:
    try:
        import onnxscript  # noqa: F401 - torch's exporter needs it
    except ImportError:
        raise RecsysError(
            "ONNX export needs the export extra: pip install -e '.[export]'"
        ) from None
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed"
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        program = torch.onnx.export(
            step,
            _probe(network),
            input_names=["item", "state"],
            output_names=["new_state", "scores"],
            dynamic_shapes={"item": {0: batch}, "state": {0: batch}},
            opset_version=OPSET,
            dynamo=True,
            verbose=False,
        )
        program.save(str(path), external_data=False)
    except Exception as exc:  # noqa: BLE001 - the exporter's errors are pages long
        raise RecsysError(f"ONNX export failed: {first_line(exc)}") from None


def load_exported(fmt: str, path: Path) -> Any:
    """A callable ``(item ndarray, state ndarray) -> (new_state, scores)`` ndarrays."""
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch 2.13 marks TorchScript deprecated
            module = torch.jit.load(str(path))

        def run_ts(item: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            with torch.no_grad():
                new, scores = module(torch.from_numpy(item), torch.from_numpy(state))
            return new.numpy(), scores.numpy()

        return run_ts
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run_onnx(item: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        new, scores = session.run(["new_state", "scores"], {"item": item, "state": state})
        return new, scores

    return run_onnx


def check_export(step: ScoringStep, fmt: str, path: Path) -> None:
    """The written file against the torch step on a probe; skipped for ONNX without
    onnxruntime (the export extra), which the ONNX export itself does not need."""
    if fmt == "onnx":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return
    items, state = _probe(step.network, rows=4)
    with torch.no_grad():
        want_state, want_scores = step(items, state)
    got_state, got_scores = load_exported(fmt, path)(items.numpy(), state.numpy())
    worst = max(
        float(np.abs(got_state - want_state.numpy()).max()),
        float(np.abs(got_scores - want_scores.numpy()).max()),
    )
    if not worst <= CHECK_TOLERANCE:
        raise RecsysError(
            f"the exported {fmt} step differs from torch by {worst:.2e} (> {CHECK_TOLERANCE})"
        )


def _items(rec: SessionRecommender) -> dict[str, Any]:
    popular = rec.popular(POPULAR).items
    return {"ids": list(rec.item_ids), "popular": popular}


def _meta(rec: SessionRecommender, fmt: str) -> dict[str, Any]:
    layers = list(rec.model.layers)
    width = sum(rec.model.state_sizes)
    return {
        "format": fmt,
        "file": FILES[fmt],
        "cell": rec.model.cell,
        "layers": layers,
        "state_size": width,
        "n_items": rec.n_items,
        "inputs": {"item": "int64 (batch,)", "state": f"float32 (batch, {width})"},
        "outputs": {
            "new_state": f"float32 (batch, {width})",
            "scores": f"float32 (batch, {rec.n_items})",
        },
        "dataset": rec.trained.dataset,
    }
