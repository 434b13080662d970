"""The native training kernels (recsys/model/kernels.cpp) against the torch ops they replace."""

from __future__ import annotations

import fcntl
import math
import threading
from pathlib import Path
from types import ModuleType

import pytest
import torch

import recsys.model.kernels as kernels_module
from recsys.core.errors import RecsysError
from recsys.model.gru4rec import GRU4Rec, gru_cell_from_gates, inverted_dropout
from recsys.model.kernels import native_kernels
from recsys.model.losses import bpr_max
from recsys.model.optimizer import RowAdagradM
from recsys.model.readout import GATE_INIT, NO_ITEM
from recsys.training.readout_loss import SampledPartition, step_readout_loss
from tests.conftest import skip_or_fail_in_ci
from tests.helpers import deterministic_log, small_train_config


@pytest.fixture(scope="module")
def kernels() -> ModuleType:
    """The built module; without a C++ compiler the tests skip, except in CI, where they fail."""
    try:
        module = native_kernels("native", torch.device("cpu"))
    except RecsysError as exc:
        skip_or_fail_in_ci(f"the native kernels: {exc}")
    assert module is not None
    return module


@pytest.mark.parametrize("momentum", [0.0, 0.15])
@pytest.mark.parametrize("shape", [(50, 8), (50,)])  # item rows, item biases
def test_row_update_equals_torch_ops(
    kernels: ModuleType, momentum: float, shape: tuple[int, ...]
) -> None:
    gen = torch.Generator().manual_seed(0)
    fused, plain = RowAdagradM(0.05, momentum, kernels=kernels), RowAdagradM(0.05, momentum)
    p_fused = torch.randn(shape, generator=gen)
    p_plain = p_fused.clone()
    touched = torch.zeros(shape[0], dtype=torch.bool)
    for _ in range(4):
        rows = torch.randperm(shape[0], generator=gen)[:17]  # distinct, unsorted
        touched[rows] = True
        grad = torch.randn((17, *shape[1:]), generator=gen) * 3
        version = p_fused._version
        fused.rows("w", p_fused, rows, grad)
        plain.rows("w", p_plain, rows, grad)
        assert p_fused._version > version  # caches keyed on the version see the change
    assert torch.allclose(p_fused, p_plain, rtol=1e-6, atol=1e-7)
    assert torch.allclose(fused.row_state["w"], plain.row_state["w"], rtol=1e-6, atol=1e-7)
    assert torch.equal(p_fused[~touched], p_plain[~touched])  # untouched rows: not written


@pytest.mark.parametrize("momentum", [0.0, 0.3])
def test_dense_update_equals_torch_ops(kernels: ModuleType, momentum: float) -> None:
    gen = torch.Generator().manual_seed(1)
    fused, plain = RowAdagradM(0.1, momentum, kernels=kernels), RowAdagradM(0.1, momentum)
    params = [torch.randn(40_000, generator=gen), torch.randn(30, 20, generator=gen)]
    copies = [p.clone() for p in params]
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        fused.dense_all(["a", "b"], params, grads)
        plain.dense_all(["a", "b"], copies, grads)
    for p, q in zip(params, copies, strict=True):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("elu", [0.0, 1.0])
def test_bpr_max_kernel_equals_the_reference_loss_and_gradient(
    kernels: ModuleType, elu: float
) -> None:
    gen = torch.Generator().manual_seed(2)
    scores = torch.randn(16, 200, generator=gen) * 4
    scores[3, 3] = -40.0  # a positive far below its negatives
    scores[5, 10:20] = 30.0  # large, tied negatives
    scores[7] = 0.25  # a row of ties
    ref_in, fused_in = scores.clone().requires_grad_(), scores.clone().requires_grad_()
    ref = bpr_max(ref_in, 0.9, elu)
    fused = bpr_max(fused_in, 0.9, elu, kernels)
    (ref * 0.5).backward()
    (fused * 0.5).backward()
    assert float(fused.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    assert torch.allclose(fused_in.grad, ref_in.grad, rtol=1e-4, atol=1e-6)  # type: ignore[arg-type]


@pytest.mark.parametrize("bf16", [False, True])
def test_gru_cell_kernel_equals_the_reference_cell_and_its_gradients(
    kernels: ModuleType, bf16: bool
) -> None:
    gen = torch.Generator().manual_seed(4)
    b, h_dim = 24, 40
    gi = torch.randn(b, 3 * h_dim, generator=gen) * 4  # saturating gates included
    h = torch.randn(b, h_dim, generator=gen)
    w = torch.randn(3 * h_dim, h_dim, generator=gen) * 0.3
    bias = torch.randn(3 * h_dim, generator=gen)
    upstream = torch.randn(b, h_dim, generator=gen)
    results = []
    for native in (None, kernels):
        leaves = [t.clone().requires_grad_() for t in (gi, h, w, bias)]
        out = gru_cell_from_gates(*leaves, bf16=bf16, kernels=native)
        out.backward(upstream)
        results.append([out.detach(), *(t.grad for t in leaves)])
    for ref, fused in zip(*results, strict=True):
        assert torch.allclose(fused, ref, rtol=1e-5, atol=1e-5)


def test_dropout_mask_keeps_each_unit_with_probability_one_minus_p(kernels: ModuleType) -> None:
    n, p = 1_000_000, 0.3
    mask = kernels.dropout_mask(n, p, 12345)
    kept = mask > 0
    assert abs(float(kept.float().mean()) - 0.7) < 4 * math.sqrt(0.7 * 0.3 / n)
    assert torch.allclose(mask[kept], torch.tensor(1 / 0.7))  # inverted: scaled at train time
    k = kept.float()
    lag1 = float(torch.corrcoef(torch.stack([k[:-1], k[1:]]))[0, 1])
    other = kernels.dropout_mask(n, p, 54321) > 0
    across = float(torch.corrcoef(torch.stack([k, other.float()]))[0, 1])
    assert abs(lag1) < 4 / math.sqrt(n) and abs(across) < 4 / math.sqrt(n)  # independent units
    assert torch.equal(kernels.dropout_mask(n, p, 12345), mask)  # the seed decides the mask


def test_native_dropout_draws_its_seed_from_torch(kernels: ModuleType) -> None:
    """The mask's seed comes from torch's generator, so a checkpoint (which saves its state)
    resumes the same masks."""
    x = torch.ones(64, 32)
    torch.manual_seed(5)
    a = inverted_dropout(x, 0.5, kernels)
    torch.manual_seed(5)
    b = inverted_dropout(x, 0.5, kernels)
    c = inverted_dropout(x, 0.5, kernels)
    assert torch.equal(a, b) and not torch.equal(b, c)


def _readout_step(seed: int, n_sample: int) -> tuple[GRU4Rec, tuple[torch.Tensor, ...]]:
    """A readout network over 12 items and one step of 7 slots as the trainer hands it to the
    head: out, scores over the in-batch targets and ``n_sample`` shared samples, the samples,
    history and targets. A short session, repeats, a target in the history and others not,
    gates nearly closed and far open."""
    from recsys.config import ModelConfig

    gen = torch.Generator().manual_seed(seed)
    model = GRU4Rec(12, ModelConfig(layers=[8], readout="repeat", repeat_window=6), seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    out = torch.randn(7, 8, generator=gen)
    out[4:] *= 40.0  # gates far open: x = g f on both sides of log(e^x - 1)'s switch at 20
    history = torch.randint(0, 9, (7, 6), generator=gen)
    history[0, 2:] = NO_ITEM  # a short session
    history[1] = torch.tensor([4, 4, 2, 4, 7, 2])  # repeats
    targets = torch.randint(0, 12, (7,), generator=gen)
    targets[0] = history[0, 1]  # the target in the history
    samples = torch.randint(0, 12, (n_sample,), generator=gen)
    columns = torch.cat((targets, samples))
    scores = (out @ model.item_out[columns].t() + model.item_bias[columns]) * 0.2
    return model, (out, scores.detach(), samples, history, targets)


@pytest.mark.parametrize("rows", [[], [3], [1, 4, 5], list(range(7))])
@pytest.mark.parametrize("n_sample", [50, 0])
def test_readout_kernel_equals_the_torch_likelihood_and_gradient(
    kernels: ModuleType, rows: list[int], n_sample: int
) -> None:
    """The compiled head (its gathers included) gives the torch path's loss and gradients, for
    any subset of slots, with shared samples or (none drawn) the in-batch targets as negatives."""
    partition = SampledPartition(torch.arange(1.0, 13.0), 0.5, torch.device("cpu"))
    results = []
    for module in (kernels, None):
        model, (out, scores, samples, history, targets) = _readout_step(5, n_sample)
        slots = torch.tensor(rows, dtype=torch.int64)
        step = (model, partition, out, scores, samples, history, targets, slots)
        loss = step_readout_loss(*step, kernels=module)
        (loss * 0.5).backward()
        assert model.readout is not None
        grads = {n: p.grad for n, p in model.readout.named_parameters()}
        results.append((float(loss.detach()), grads))
    (native, native_grads), (reference, reference_grads) = results
    assert native == pytest.approx(reference, rel=1e-5, abs=1e-6)
    for name, grad in reference_grads.items():
        assert grad is not None and native_grads[name] is not None, name
        assert torch.allclose(native_grads[name], grad, rtol=1e-4, atol=1e-6), name
        assert not rows or float(grad.abs().sum()) > 0, name


@pytest.mark.parametrize(
    ("layers", "embedding"), [([24], "shared"), ([16, 12], "separate"), ([16, 12], "none")]
)
def test_native_and_torch_training_steps_agree(
    kernels: ModuleType, layers: list[int], embedding: str
) -> None:
    """A few whole BPR-max steps with momentum: the kernels give the torch ops' weights, in every
    embedding mode and with several layers."""
    from recsys.config import ModelConfig
    from recsys.data.batching import session_arrays
    from recsys.training.trainer import Trainer, item_support

    log = deterministic_log()
    weights = []
    for setting in ("native", "torch"):
        cfg = small_train_config(loss="bpr-max", momentum=0.3, max_steps=5, kernels=setting)
        torch.manual_seed(0)
        model = GRU4Rec(30, ModelConfig(layers=layers, embedding=embedding), seed=0)
        trainer = Trainer(model, cfg, item_support(log, 30), torch.device("cpu"))
        assert (trainer.kernels is not None) == (setting == "native")
        trainer.run_epoch(session_arrays(log), 0)
        weights.append(model.state_dict())
    for name in weights[0]:
        assert torch.allclose(weights[0][name], weights[1][name], rtol=1e-4, atol=1e-6), name


def test_auto_falls_back_to_torch_ops_with_a_note_and_native_fails_clearly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(kernels_module, "_load", lambda: "g++: command not found")
    kernels_module._note_fallback.cache_clear()
    assert native_kernels("auto", torch.device("cpu")) is None
    assert "could not be built (g++: command not found)" in capsys.readouterr().err
    with pytest.raises(RecsysError, match="could not be built.*g\\+\\+: command not found"):
        native_kernels("native", torch.device("cpu"))
    assert native_kernels("torch", torch.device("cpu")) is None


def test_missing_kernel_sources_are_a_reason_not_a_crash(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A copy of the package without its C++ sources (the ranker asks for the module when a
    served model loads): the loader says why, and callers fall back to torch."""
    monkeypatch.setattr(kernels_module, "SOURCES", (tmp_path / "gone.cpp",))
    reason = kernels_module._load.__wrapped__()
    assert isinstance(reason, str) and "cannot be read" in reason and "gone.cpp" in reason


def test_kernels_are_cpu_only() -> None:
    gpu = torch.device("cuda")
    assert native_kernels("auto", gpu) is None  # a GPU uses torch ops
    with pytest.raises(RecsysError, match="'native' is for CPU training"):
        native_kernels("native", gpu)


def test_a_lock_left_by_a_killed_build_does_not_block_the_next_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch waits for its build lock without a timeout, and kill -9 leaves it however recent
    (the tune test's killed worker left one within its up-to-date check): it is removed."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("RECSYS_KERNELS_DIR", str(tmp_path))
    where = kernels_module.build_directory()
    where.mkdir(parents=True)
    lock = where / "lock"
    lock.touch()  # just now: no age tells a dead holder from a live one
    seen = {}

    def fake_build(name: str, **kwargs: object) -> ModuleType:
        seen["lock"] = lock.exists()
        seen["dir"] = kwargs["build_directory"]
        return ModuleType(name)

    monkeypatch.setattr(cpp_extension, "load_inline", fake_build)
    assert isinstance(kernels_module._load.__wrapped__(), ModuleType)
    assert seen == {"lock": False, "dir": str(where)}


def test_a_live_build_elsewhere_is_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While another builder holds the build folder's OS lock, a second one waits for it
    instead of removing torch's lock under a live build."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("RECSYS_KERNELS_DIR", str(tmp_path))
    where = kernels_module.build_directory()
    where.mkdir(parents=True)
    built = threading.Event()
    monkeypatch.setattr(
        cpp_extension, "load_inline", lambda name, **kwargs: built.set() or ModuleType(name)
    )
    with open(where / "build.flock", "w") as other:  # another open file: another holder
        fcntl.flock(other, fcntl.LOCK_EX)
        waiter = threading.Thread(target=kernels_module._load.__wrapped__, daemon=True)
        waiter.start()
        assert not built.wait(1.0)  # blocked behind the live build
        fcntl.flock(other, fcntl.LOCK_UN)
    assert built.wait(10.0)
    waiter.join(10.0)


def test_native_and_torch_training_with_the_readout_agree(kernels: ModuleType) -> None:
    """Cross-entropy steps with the repeat readout and held-out sessions: the compiled likelihood
    trains the readout (and leaves the network) as the torch ops do."""
    from recsys.config import ModelConfig
    from recsys.data.batching import session_arrays
    from recsys.training.trainer import Trainer, item_support

    log = deterministic_log()
    model_cfg = ModelConfig(layers=[16], readout="repeat", repeat_window=4, repeat_holdout=0.3)
    weights = []
    for setting in ("native", "torch"):
        cfg = small_train_config(loss="cross-entropy", n_sample=8, max_steps=6, kernels=setting)
        torch.manual_seed(0)
        model = GRU4Rec(30, model_cfg, seed=0)
        trainer = Trainer(model, cfg, item_support(log, 30), torch.device("cpu"))
        trainer.run_epoch(session_arrays(log), 0)
        weights.append(model.state_dict())
    assert float(weights[0]["readout.gate_b"]) != GATE_INIT  # the readout learned in these steps
    for name in weights[0]:
        assert torch.allclose(weights[0][name], weights[1][name], rtol=1e-4, atol=1e-6), name
