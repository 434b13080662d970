"""``model.cell``: each cell against torch's own cell, one training step against a plain
reference, the GRU unchanged, live sessions and the exported step equal to re-runs, and an LSTM
trained, registered and served over REST."""

from __future__ import annotations

import copy
import json
import os
import re
import sys
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.serve import free_port, start_server, stop_server, wait_ready
from recsys.config import ModelConfig, TrainConfig, config_from_dict, load_config
from recsys.core.errors import RecsysError
from recsys.model.artifact import ItemIndex, TrainedModel
from recsys.model.gru4rec import GRU4Rec
from recsys.model.kernels import native_kernels
from recsys.serving.export import export_model, load_exported
from recsys.serving.live_store import output_of, replay_states, step_states
from recsys.serving.recommender import SessionRecommender
from recsys.training.trainer import Trainer, train_gru4rec
from tests.conftest import QUIET, ROOT, run_cli, tiny_config, write_config
from tests.helpers import (
    assert_same,
    deterministic_log,
    resumed_after_interrupt,
    small_train_config,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # SQLAlchemy, in MLflow

CELLS = ["gru", "lstm", "rnn", "ffn"]
MODES = {"gru": "shared", "lstm": "none", "rnn": "separate", "ffn": "shared"}  # one mode each
TORCH_CELLS = {"gru": nn.GRUCell, "lstm": nn.LSTMCell, "rnn": nn.RNNCell}
N_ITEMS = 20


def network(
    cell: str,
    layers: list[int],
    embedding: str = "separate",
    seed: int = 3,
    readout: str = "gru4rec",
) -> GRU4Rec:
    """A network of ``cell`` with non-zero biases (they start at zero, which would hide them)."""
    config = ModelConfig(layers=layers, cell=cell, embedding=embedding, readout=readout)
    net = GRU4Rec(N_ITEMS, config, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in (*net.b_ih, *net.b_hh):
            b.copy_(torch.rand(b.shape, generator=gen) - 0.5)
        if net.readout is not None:  # a gate that reads the output (it starts at zero)
            net.readout.gate_w.copy_(torch.rand(net.readout.gate_w.shape, generator=gen) - 0.5)
    return net


def torch_layers(net: GRU4Rec) -> list[nn.Module]:
    """torch's own cell per layer (nn.Linear for ffn) holding copies of the network's weights."""
    mods: list[nn.Module] = []
    for k, units in enumerate(net.layers):
        fan_in = net.w_ih[k].shape[1]
        with torch.no_grad():
            if net.cell == "ffn":
                mod = nn.Linear(fan_in, units)
                mod.weight.copy_(net.w_ih[k])
                mod.bias.copy_(net.b_ih[k])
            else:
                mod = TORCH_CELLS[net.cell](fan_in, units)
                for ours, theirs in zip(
                    (net.w_ih[k], net.w_hh[k], net.b_ih[k], net.b_hh[k]),
                    (mod.weight_ih, mod.weight_hh, mod.bias_ih, mod.bias_hh),
                    strict=True,
                ):
                    theirs.copy_(ours)
        mods.append(mod)
    return mods


def torch_step(
    cell: str, mods: list[nn.Module], x: torch.Tensor, states: list[torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The step through torch's cells; an LSTM layer's state is [c, h] side by side."""
    new = []
    for mod, s in zip(mods, states, strict=True):
        if cell == "lstm":
            units = s.shape[1] // 2
            h, c = mod(x, (s[:, units:], s[:, :units]))
            new.append(torch.cat((c, h), 1))
            x = h
        elif cell == "ffn":
            x = torch.tanh(mod(x))
            new.append(x)
        else:
            x = mod(x, s)
            new.append(x)
    return x, new


def grads(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.grad if t.grad is not None else torch.zeros_like(t) for t in tensors]


@pytest.mark.parametrize("kernels", ["torch", "native"])
@pytest.mark.parametrize("cell", CELLS)
def test_each_cell_step_equals_torchs_own_cell_outputs_and_gradients(
    cell: str, kernels: str
) -> None:
    native = native_kernels("auto", torch.device("cpu")) if kernels == "native" else None
    if kernels == "native" and native is None:
        pytest.skip("the native kernels do not build here")
    net = network(cell, [6, 5])
    mods = torch_layers(net)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=gen)
    states = [torch.randn(4, s, generator=gen) for s in net.state_sizes]
    weights = [torch.randn(4, s, generator=gen) for s in net.state_sizes]  # a loss over states

    runs = []
    for step in (
        lambda xs, ss: net.step(xs, ss, train=True, kernels=native),
        lambda xs, ss: torch_step(cell, mods, xs, ss),
    ):
        xs = x.clone().requires_grad_()
        ss = [s.clone().requires_grad_() for s in states]
        out, new = step(xs, ss)
        loss = out.square().sum() + sum((n * w).sum() for n, w in zip(new, weights, strict=True))
        loss.backward()
        runs.append((out, new, grads([xs, *ss])))
    (out, new, g), (t_out, t_new, t_g) = runs
    assert torch.allclose(out, t_out, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(new, t_new, strict=True))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g, t_g, strict=True))
    for k, mod in enumerate(mods):
        ours = [net.w_ih[k], net.b_ih[k]] + ([net.w_hh[k], net.b_hh[k]] if cell != "ffn" else [])
        theirs = [p for p in mod.parameters()]
        if cell == "ffn":
            assert net.w_hh[k].numel() == 0  # no recurrent weights: nothing reads the state
        else:  # torch's order: weight_ih, weight_hh, bias_ih, bias_hh
            theirs = [theirs[0], theirs[2], theirs[1], theirs[3]]
        assert all(
            torch.allclose(a, b, atol=1e-5) for a, b in zip(grads(ours), grads(theirs), strict=True)
        )
    if cell == "ffn":  # the memory-less control: its output is the same from any state
        zero = [torch.zeros_like(s) for s in states]
        assert torch.equal(net.step(x, zero, train=False)[0], net.step(x, states, train=False)[0])


def plain_cell(
    cell: str, gi: torch.Tensor, s: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor
) -> torch.Tensor:
    """The textbook equations, written out (gates in torch's order)."""
    if cell == "ffn":
        return torch.tanh(gi)
    gh = s[:, -w_hh.shape[1] :] @ w_hh.T + b_hh
    if cell == "rnn":
        return torch.tanh(gi + gh)
    if cell == "gru":
        ir, iz, i_n = gi.chunk(3, 1)
        hr, hz, h_n = gh.chunk(3, 1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        n = torch.tanh(i_n + r * h_n)
        return (1 - z) * n + z * s
    c = s[:, : w_hh.shape[1]]  # the state is [c, h]; gh above read h
    i, f, g, o = (gi + gh).chunk(4, 1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.cat((c, torch.sigmoid(o) * torch.tanh(c)), 1)


@pytest.mark.parametrize("cell", CELLS)
def test_one_training_step_equals_a_plain_reference(cell: str) -> None:
    """Loss, new state and every updated weight and item row of one Trainer step, against
    dense autograd through the plain equations and Adagrad's first step written out."""
    mode = MODES[cell]
    net = network(cell, [6], embedding=mode)
    ref = copy.deepcopy(net)
    cfg = TrainConfig(batch_size=4, n_sample=0, learning_rate=0.1)
    trainer = Trainer(net, cfg, torch.ones(N_ITEMS), torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    inputs, targets = torch.tensor([3, 7, 3, 11]), torch.tensor([5, 3, 12, 5])
    states = [torch.randn(4, s, generator=gen) for s in net.state_sizes]
    loss, new = trainer.train_step(inputs, targets, [s.clone() for s in states])

    params = dict(ref.named_parameters())
    if mode == "none":
        gi = params["item_in"][inputs] + params["b_ih.0"]
    else:
        table = params["item_out" if mode == "shared" else "item_in"]
        gi = table[inputs] @ params["w_ih.0"].T + params["b_ih.0"]
    state = plain_cell(cell, gi, states[0], params["w_hh.0"], params["b_hh.0"])
    out = state[:, -6:]
    scores = out @ params["item_out"][targets].T + params["item_bias"][targets]
    ref_loss = -torch.diagonal(torch.log_softmax(scores, 1)).sum() / cfg.batch_size
    ref_loss.backward()

    assert torch.allclose(loss, ref_loss.detach(), atol=1e-6)
    assert torch.allclose(new[0], state.detach(), atol=1e-6)
    for name, p in params.items():
        if p.numel() == 0:
            continue
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        want = p.detach() - cfg.learning_rate * g / torch.sqrt(g * g + 1e-6)  # Adagrad, step 1
        got = dict(net.named_parameters())[name].detach()
        assert torch.allclose(got, want, atol=1e-5), name
    untouched = sorted(set(range(N_ITEMS)) - set(inputs.tolist()) - set(targets.tolist()))
    assert torch.equal(net.item_out[untouched], ref.item_out[untouched])  # rows: only the step's


def test_cell_gru_is_the_model_without_the_key_and_old_files_load_as_gru(tmp_path: Path) -> None:
    log = deterministic_log(n_sessions=200)
    cfg = small_train_config(max_steps=5)
    runs = []
    for model in ({"layers": [8]}, {"layers": [8], "cell": "gru"}):
        config = config_from_dict(tiny_config(tmp_path, model=model))
        runs.append(train_gru4rec(log, 30, config.model, cfg).model)
    a, b = (m.state_dict() for m in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    path = tmp_path / "model.pt"
    TrainedModel(runs[0], ItemIndex.of(list(range(30)))).save(path)
    payload = torch.load(path, weights_only=True)
    assert payload["model_config"].pop("cell") == "gru"  # the file carries the cell
    torch.save(payload, path)  # as written before model.cell existed
    old = TrainedModel.load(path).network
    assert old.cell == "gru"
    assert all(torch.equal(v, old.state_dict()[k]) for k, v in a.items())


def test_an_unknown_cell_is_one_config_error_naming_the_key(tmp_path: Path) -> None:
    raw = tiny_config(tmp_path, model={"cell": "transformer"})
    with pytest.raises(RecsysError, match=r"model\.cell: .*'gru', 'lstm', 'rnn' or 'ffn'"):
        load_config(write_config(tmp_path / "c.yaml", raw))


@pytest.mark.parametrize("cell", ["lstm", "rnn", "ffn"])
def test_two_layers_with_dropouts_and_bpr_max_resume_as_an_uninterrupted_run(
    cell: str, tmp_path: Path
) -> None:
    """Each cell (each in another embedding mode) with both dropouts, momentum and the
    sampler: stopped after epoch 1, resumed from its checkpoint (loaded weights_only), it
    ends with the uninterrupted run's weights."""
    log = deterministic_log(n_sessions=200)
    model_cfg = ModelConfig(
        layers=[12, 8], cell=cell, embedding=MODES[cell], dropout_embed=0.1, dropout_hidden=0.2
    )
    cfg = small_train_config(epochs=2, momentum=0.2, loss="bpr-max")
    straight = train_gru4rec(log, 30, model_cfg, cfg).model.state_dict()

    resumed = resumed_after_interrupt(train_gru4rec, tmp_path, 1, log, 30, model_cfg, cfg)
    assert resumed.resumed_from == 1
    assert all(torch.equal(v, resumed.model.state_dict()[k]) for k, v in straight.items())


@pytest.mark.parametrize("cell", CELLS)
def test_live_sessions_and_the_live_service_step_equal_reruns(cell: str) -> None:
    readout = "repeat" if cell == "lstm" else "gru4rec"  # the readout reads any cell's output
    net = network(cell, [8, 6], embedding=MODES[cell], readout=readout).eval()
    rec = SessionRecommender(TrainedModel(net, ItemIndex.of([f"i{i}" for i in range(N_ITEMS)])))
    sessions = [["i3", "i7", "i3", "i11", "i0", "i19"], ["i5", "i2"], ["i9"]]
    live = rec.live()
    for sid, session in enumerate(sessions):
        for t in range(len(session)):
            assert_same(
                live.click(sid, session[t], k=10), rec.recommend(session[: t + 1], k=10), 1e-5
            )
    # the live service's batched step (recsys serve-live): states of several sessions at once
    idx = [[rec.index[i] for i in s] for s in sessions]
    states: list[torch.Tensor | None] = [None] * len(idx)
    for t in range(max(map(len, idx))):
        rows = [i for i, s in enumerate(idx) if t < len(s)]
        stepped = step_states(net, [states[i] for i in rows], [idx[i][t] for i in rows])
        for row, i in enumerate(rows):
            states[i] = stepped[row]
    want = net.last_outputs([np.asarray(s) for s in idx])
    for i, state in enumerate(states):
        assert state is not None
        assert torch.allclose(output_of(net, state), want[i], atol=1e-6)
    assert all(
        torch.allclose(a, b, atol=1e-6)  # type: ignore[arg-type]
        for a, b in zip(replay_states(net, idx), states, strict=True)
    )


@pytest.mark.parametrize(
    ("cell", "fmt"),
    [("lstm", "torchscript"), ("rnn", "torchscript"), ("ffn", "torchscript"), ("lstm", "onnx")],
)
def test_exported_step_of_each_cell_scores_as_the_library(
    cell: str, fmt: str, tmp_path: Path
) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="the export extra: pip install -e '.[export]'")
    net = network(cell, [8, 6], embedding=MODES[cell]).eval()
    rec = SessionRecommender(TrainedModel(net, ItemIndex.of(list(range(N_ITEMS)))))
    path = export_model(rec, fmt, tmp_path / "out")  # checks itself on a probe
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert (meta["cell"], meta["state_size"]) == (cell, sum(net.state_sizes))
    step = load_exported(fmt, path)
    session = [3, 7, 3, 11]
    state = np.zeros((1, meta["state_size"]), np.float32)
    for item in session:
        state, scores = step(np.array([item]), state)
    with torch.no_grad():
        want = F.linear(net.last_outputs([np.asarray(session)]), net.item_out, net.item_bias)
    assert np.allclose(scores, want.numpy(), atol=1e-5)


def test_an_lstm_registers_serves_over_rest_and_answers_the_readme_curl(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "mlops").mkdir()
    env = {
        **QUIET,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlops' / 'mlflow.db'}",
        "OMP_NUM_THREADS": "1",
    }
    raw = tiny_config(
        tmp_path / "data",
        name="lstm",
        model={"layers": [16], "cell": "lstm"},
        train={"epochs": 1, "threads": 1, "max_steps": 30},
        evaluation={"baselines": {"pop": {"kind": "pop"}}},
        tracking={"system_metrics": False},
    )
    raw["data"]["source"]["synthetic"]["n_sessions"] = 1000
    config = write_config(tmp_path / "lstm.yaml", raw)
    proc = run_cli("pipeline", "--config", str(config), env=env)
    assert proc.returncode == 0, proc.stderr
    assert "load it with: models:/gru4rec-lstm@champion" in proc.stdout

    readme = (ROOT / "README.md").read_text()
    body = re.search(
        r"curl -s -X POST http://127\.0\.0\.1:\d+/invocations.*?-d '([^']+)'", readme, re.S
    )
    assert body is not None, "the README's curl example"
    port = free_port()
    command = [sys.executable, "-m", "pipelines.cli", "serve", "--config", str(config)]
    log = tmp_path / "server.log"
    server = start_server([*command, "--port", str(port)], {**os.environ, **env}, log, ROOT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, server, log)

        def post(text: str) -> dict[str, Any]:
            request = urllib.request.Request(
                f"{url}/invocations", text.encode(), {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=30) as response:
                assert response.status == 200
                return json.loads(response.read())  # type: ignore[no-any-return]

        answer = post(body.group(1))["predictions"]
        assert len(answer) == 2 and answer[1]["fallback"] == "popular"
        assert all(len(a["items"]) == 5 for a in answer)
        # known ids: the served LSTM ranks as the library does on the same registered model
        items = json.loads(body.group(1))
        monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
        library = SessionRecommender.load("models:/gru4rec-lstm@champion")
        assert library.model.cell == "lstm"
        known = library.item_ids[:3]
        items["dataframe_records"] = [{"items": known}]
        (got,) = post(json.dumps(items))["predictions"]
        want = library.recommend(known, k=5)
        assert got["items"] == want.items
        assert np.allclose(got["scores"], want.scores, atol=1e-5)
    finally:
        stop_server(server)
