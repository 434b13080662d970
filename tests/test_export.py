"""`recsys export`: the scoring step outside recsys, against torch on real RSC15 test sessions.

TorchScript is tested always; ONNX needs onnxruntime (the `export` extra, which `make test`
installs) and is skipped only without it. Each exported step is played click by click through
real test sessions: its state and scores within 1e-5 of torch's, its top-20 the library's.
The docs' ONNX client (docs/serving.md, "Export") is run as written, as a subprocess.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from recsys.core.errors import RecsysError
from recsys.data.preparation import PreparedDataset
from recsys.serving.export import export_model, load_exported
from recsys.serving.live_store import step_states
from recsys.serving.recommender import SessionRecommender
from tests.conftest import ROOT, run_cli
from tests.helpers import real_sessions

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def rec(trained: tuple[PreparedDataset, Path]) -> SessionRecommender:
    return SessionRecommender.load(trained[1])


@pytest.fixture(scope="module")
def sessions(trained: tuple[PreparedDataset, Path]) -> list[list[int]]:
    return real_sessions(trained[0], 40)


def play(rec: SessionRecommender, step: Any, sessions: list[list[int]]) -> int:
    """Every known click of every session through the exported step and through torch."""
    checked = 0
    for session in sessions:
        state = np.zeros((1, sum(rec.model.layers)), np.float32)
        torch_state: torch.Tensor | None = None
        prefix: list[int] = []
        for item in session:
            prefix.append(item)
            known, _ = rec.to_indices([item])
            if not known:
                continue
            state, scores = step(np.array(known, np.int64), state)
            torch_state = step_states(rec.model, [torch_state], known)[0]
            out = torch_state[-rec.model.layers[-1] :].unsqueeze(0)
            want_scores = rec.ranker.full_scores(out)[0].numpy()
            np.testing.assert_allclose(state[0], torch_state.numpy(), rtol=0, atol=TOLERANCE)
            np.testing.assert_allclose(scores[0], want_scores, rtol=0, atol=TOLERANCE)
            top = np.argsort(-scores[0], kind="stable")[:20]
            assert [rec.item_ids[i] for i in top] == rec.recommend(prefix, k=20).items
            checked += 1
    return checked


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_exported_step_matches_torch_and_the_library_top20(
    fmt: str, rec: SessionRecommender, sessions: list[list[int]], tmp_path: Path
) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="the export extra: pip install -e '.[export]'")
    path = export_model(rec, fmt, tmp_path / fmt)
    assert path.is_file() and {p.name for p in path.parent.iterdir()} == {
        path.name,
        "items.json",
        "meta.json",
    }
    assert play(rec, load_exported(fmt, path), sessions) > 100


def test_docs_onnx_client_prints_the_library_ranking(
    rec: SessionRecommender, sessions: list[list[int]], tmp_path: Path
) -> None:
    pytest.importorskip("onnxruntime", reason="the export extra: pip install -e '.[export]'")
    docs = (ROOT / "docs" / "serving.md").read_text()
    match = re.search(r"```python\n(# client\.py.*?)```", docs, re.S)
    assert match, "docs/serving.md lost its ONNX client"
    assert len(match.group(1).splitlines()) <= 25
    client = tmp_path / "client.py"
    client.write_text(match.group(1))
    folder = export_model(rec, "onnx", tmp_path / "onnx").parent
    for session in (sessions[0], sessions[1] + [987654321], [987654321]):
        args = [sys.executable, str(client), str(folder), ",".join(map(str, session))]
        proc = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == [str(i) for i in rec.recommend(session, k=20).items]


def test_export_cli_writes_the_step_and_bad_input_is_one_line(
    trained: tuple[PreparedDataset, Path], tmp_path: Path
) -> None:
    out = tmp_path / "ts"
    proc = run_cli("export", "-m", str(trained[1]), "--format", "torchscript", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert (out / "scoring_step.pt").is_file() and (out / "meta.json").is_file()
    missing = run_cli("export", "-m", str(tmp_path / "nope"), "--format", "onnx", "-o", str(out))
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nope'}: model file not found"
    ]
    assert (out / "scoring_step.pt").is_file()  # the earlier export is untouched


def test_a_model_with_the_repeat_readout_is_refused(
    rec: SessionRecommender, tmp_path: Path
) -> None:
    from recsys.config import ModelConfig
    from recsys.model.artifact import TrainedModel
    from recsys.model.gru4rec import GRU4Rec

    config = ModelConfig.model_validate({"layers": [8], "readout": "repeat"})
    network = GRU4Rec(rec.n_items, config)
    readout = SessionRecommender(TrainedModel(network, rec.trained.items))
    with pytest.raises(RecsysError, match="repeat readout"):
        export_model(readout, "torchscript", tmp_path / "r")
    assert not (tmp_path / "r").exists()
