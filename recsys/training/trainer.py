"""The GRU4Rec training loop: session-parallel steps, sampled negatives, row-sparse updates.

Per step: gather the item rows the step touches (inputs, targets, shared samples) once, run one
GRU step, score targets + samples, backpropagate through this step only (hidden values carry
over, gradients do not), and update just those rows. After every epoch a checkpoint with the
model, the optimiser and every random state is written atomically, so ``resume`` continues
exactly where an uninterrupted run would be.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from recsys.config import ModelConfig, TrainConfig
from recsys.core.atomic import atomic_path
from recsys.core.errors import RecsysError, first_line
from recsys.core.progress import Progress
from recsys.data.batching import SessionArrays, session_arrays, session_parallel_batches
from recsys.data.schema import ITEM_IDX
from recsys.model.gru4rec import GRU4Rec
from recsys.model.kernels import native_kernels
from recsys.model.losses import bpr_max, cross_entropy, top1_max
from recsys.model.matmul import bf16_is_native, linear, use_bf16
from recsys.model.optimizer import RowAdagradM
from recsys.model.readout import NO_ITEM, push
from recsys.model.sampling import SampleStore
from recsys.training.allocator import retain_freed_memory
from recsys.training.bptt import BpttWindow, reset_slots
from recsys.training.leaves import apply_updates, step_rows
from recsys.training.readout_loss import SampledPartition, step_readout_loss
from recsys.training.threads import apply_threads
from recsys.training.warm_start import WarmStart, state_on

CHECKPOINT = "last.pt"
CHECK_EVERY = 50  # steps between reading losses back (divergence check, progress bar)
EpochCallback = Callable[[dict[str, Any]], None]


def resolve_device(name: str, setting: str = "train.device") -> torch.device:
    """The torch device for "cpu", "cuda" or "auto"; ``setting`` names it in the error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RecsysError(
            f"{setting} is 'cuda' but no CUDA device is available; use 'cpu' or 'auto'"
        )
    return torch.device(name)


def item_support(events: pl.DataFrame, n_items: int) -> torch.Tensor:
    """Click counts per item index (popularity for sampling and logQ)."""
    counts = np.bincount(events[ITEM_IDX].to_numpy(), minlength=n_items)
    return torch.from_numpy(counts.astype(np.float64))


@dataclass
class Trainer:
    """Holds everything one training run mutates; ``run_epoch`` is the hot loop."""

    model: GRU4Rec
    config: TrainConfig
    support: torch.Tensor
    device: torch.device
    optimizer: RowAdagradM = field(init=False)
    sampler: SampleStore = field(init=False)
    log_pop: torch.Tensor = field(init=False)
    batches = staticmethod(session_parallel_batches)  # a data-parallel rank's: distributed.py
    writes_checkpoints = True  # not on the ranks but 0 of a data-parallel run

    def __post_init__(self) -> None:
        cfg = self.config
        self.kernels = native_kernels(cfg.kernels, self.device)
        if self.device.type == "cpu":
            retain_freed_memory()  # a step's temporaries would otherwise fault in every time
        self.optimizer = RowAdagradM(cfg.learning_rate, cfg.momentum, kernels=self.kernels)
        self.sample_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.sampler = SampleStore(
            self.support,
            cfg.n_sample,
            cfg.sample_alpha,
            cfg.sample_store_size or cfg.n_sample * 64,
            self.sample_gen,
            self.device,
        )
        self.log_pop = torch.log(self.support.clamp_min(1).to(torch.float32)).to(self.device)
        # the readout's log Z: from the shared samples (∝ pop^α), or from the in-batch targets
        # (clicks, ∝ pop) when there are no samples
        alpha = cfg.sample_alpha if cfg.n_sample else 1.0
        self.partition = SampledPartition(self.support, alpha, self.device)
        self.loss_name = cfg.loss
        self.bf16 = use_bf16(cfg.matmul, self.device)
        self.window = BpttWindow(cfg.bptt, self.device) if cfg.bptt > 1 else None
        if self.bf16 and self.device.type == "cpu" and not bf16_is_native():
            print(
                "note: train.matmul is bf16, but this CPU has no bf16 instructions (AVX512-BF16 "
                "or AMX): its products are emulated and slower than fp32; set train.matmul: fp32",
                file=sys.stderr,
            )

    # --- one step ---------------------------------------------------------------------------

    def _loss(
        self,
        scores: torch.Tensor,
        out_idx: torch.Tensor,
        n_targets: int,
        skip: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cfg = self.config
        if self.loss_name == "cross-entropy":
            shift = None
            if cfg.logq > 0:
                logp = self.log_pop[out_idx].clone()  # (B + n_sample,)
                logp[n_targets:] *= cfg.sample_alpha
                shift = cfg.logq * logp
            return cross_entropy(scores, shift, skip)
        if self.loss_name == "bpr-max":
            return bpr_max(scores, cfg.bpreg, cfg.elu_param, self.kernels)
        return top1_max(scores)

    def train_step(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        hidden: list[torch.Tensor],
        history: torch.Tensor | None = None,
        held: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One click per slot: loss, backward, row-sparse and dense updates. ``history`` (B, L):
        each slot's last items, current input first (the repeat readout's input); ``held``
        (B,): the slots whose sessions the network does not learn from (the readout's)."""
        model = self.model
        b = len(targets)
        samples = self.sampler.draw()
        out_idx = torch.cat((targets, samples))  # (B + n_sample,)
        if self.window is None:
            leaves = step_rows(model, inputs, out_idx)
            out, hidden = model.step(leaves.x, hidden, True, self.bf16, self.kernels)
        else:  # truncated BPTT: the window's inputs, recomputed from its detached start
            leaves = step_rows(model, self.window.inputs(), out_idx)
            out, hidden = self.window.forward(
                leaves.x, lambda x, h: model.step(x, h, True, self.bf16, self.kernels)
            )
        # Score each distinct row once, then spread the columns: gathering (B, U) scores is far
        # cheaper than gathering (B + n_sample, H) item vectors, forward and backward.
        distinct = linear(out, leaves.item_rows, leaves.bias_rows, self.bf16)  # (B, U)
        scores = distinct.index_select(1, leaves.out_inv)  # (B, B + n_sample)
        if held is None or self.loss_name == "cross-entropy":  # held-out slots masked there
            loss = self._loss(scores, out_idx, b, held) / self.config.batch_size
        else:  # the network's loss without the held-out slots, as rows and as positives
            rows = torch.nonzero(~held).squeeze(1)
            cols = torch.cat((rows, torch.arange(b, len(out_idx), device=rows.device)))
            loss = scores.sum() * 0.0  # no slot of the network's in this step
            if len(rows):
                # not [rows][:, cols]: index_select's backward is an index_add, not an index_put
                kept = scores.index_select(0, rows).index_select(1, cols)
                loss = self._loss(kept, out_idx[cols], len(rows))
            loss = loss / self.config.batch_size
        if model.readout is not None:
            assert history is not None
            mine = torch.arange(b, device=out.device) if held is None else torch.nonzero(held)
            step = (model, self.partition, out, scores, samples, history, targets, mine.view(-1))
            ranking = self.loss_name != "cross-entropy"
            head = step_readout_loss(*step, ranking=ranking, kernels=self.kernels)
            loss = loss + head / self.config.batch_size
        loss.backward()
        if self.window is not None:
            self.window.measure(held)

        apply_updates(self.optimizer, model, leaves)
        return loss.detach(), [h.detach() for h in hidden]

    # --- one epoch --------------------------------------------------------------------------

    def run_epoch(self, data: SessionArrays, epoch: int, label: str = "train") -> dict[str, Any]:
        cfg = self.config
        model = self.model
        model.train()
        hidden = model.init_hidden(min(cfg.batch_size, max(1, data.n_sessions)))
        if self.window is not None:
            self.window.clear()
        history = None  # each slot's last items, for the repeat readout
        if model.readout is not None:
            history = torch.full(
                (len(hidden[0]), model.readout.window), NO_ITEM, device=self.device
            )
        held_events = self.held_out_events(data)  # per click: its session is the readout's
        total = 0.0  # summed per-event loss of the steps checked so far
        pending: list[torch.Tensor] = []  # step losses not yet read back to the host
        events = 0
        steps = 0
        start = time.perf_counter()
        bar = Progress(data.n_events, f"{label} epoch {epoch + 1}/{cfg.epochs}", unit="ev")
        try:
            for step in self.batches(data, cfg.batch_size):
                if step.keep is not None:
                    keep = torch.from_numpy(step.keep).to(self.device)
                    hidden = [h.index_select(0, keep) for h in hidden]
                    if history is not None:
                        history = history.index_select(0, keep)
                if step.reset.any():
                    hidden = reset_slots(hidden, step.reset, self.device)
                    if history is not None:
                        history[torch.from_numpy(step.reset).to(self.device)] = NO_ITEM
                b = len(step.targets)
                if cfg.n_sample == 0 and b < 2:
                    break  # no negative left to rank against (only one session remains)
                inputs = torch.from_numpy(step.inputs).to(self.device)
                targets = torch.from_numpy(step.targets).to(self.device)
                if history is not None:
                    history = push(history, inputs)
                held = None
                if held_events is not None:
                    held = torch.from_numpy(held_events[step.positions]).to(self.device)
                if self.window is not None:
                    self.window.push(inputs, step.keep, step.reset, hidden)
                loss, hidden = self.train_step(inputs, targets, hidden, history, held)
                pending.append(loss)
                events += b
                steps += 1
                if steps % CHECK_EVERY == 0:
                    total += self._settle(pending, epoch, steps)
                    bar.update(events - bar.count, loss=total / max(events, 1))
                if cfg.max_steps and steps >= cfg.max_steps:
                    break
            total += self._settle(pending, epoch, steps)
        finally:
            bar.update(events - bar.count, loss=total / max(events, 1))
            bar.close()
        seconds = time.perf_counter() - start
        return {
            "epoch": epoch + 1,
            "loss": total / max(events, 1),
            "events": events,
            "steps": steps,
            "seconds": seconds,
            "events_per_second": events / seconds if seconds > 0 else 0.0,
            "products": "bf16" if self.bf16 else "fp32",
            "kernels": "native" if self.kernels is not None else "torch",
            **(self.window.epoch_norms() if self.window is not None else {}),
        }

    def held_out_events(self, data: SessionArrays) -> np.ndarray | None:
        """Per click, whether its session is one of the readout's (``model.repeat_holdout``):
        a fixed, seeded share of the sessions, the same in every epoch and after a resume."""
        share = self.model.config.repeat_holdout
        if self.model.readout is None or share == 0:
            return None
        rng = np.random.default_rng(self.config.seed + 2)
        held = rng.random(data.n_sessions) < share
        return np.repeat(held, np.diff(data.offsets))

    def _settle(self, pending: list[torch.Tensor], epoch: int, steps: int) -> float:
        """Read the pending step losses back in one transfer, stop on the first non-finite one,
        and return their summed per-event loss. Reading every step would make a GPU wait for
        each step to finish before the host may queue the next."""
        if not pending:
            return 0.0
        values = torch.stack(pending).cpu().tolist()
        first = steps - len(pending) + 1
        pending.clear()
        total = 0.0
        for i, value in enumerate(values):
            if not np.isfinite(value):
                raise RecsysError(
                    f"training diverged: the loss became {value} in epoch {epoch + 1}, step "
                    f"{first + i}; lower train.learning_rate (now {self.config.learning_rate}) "
                    f"or check the data"
                )
            total += value * self.config.batch_size
        return total

    # --- checkpoints ------------------------------------------------------------------------

    def checkpoint_state(self, epoch: int, history: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "history": history,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "sampler": self.sampler.state(),
            "sample_rng": self.sample_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
        }

    def load_checkpoint(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(
            {k: {n: t.to(self.device) for n, t in v.items()} for k, v in state["optimizer"].items()}
        )
        self.sampler.load_state(state["sampler"])
        self.sample_gen.set_state(state["sample_rng"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(state["cuda_rng"])


@dataclass
class TrainResult:
    model: GRU4Rec
    history: list[dict[str, Any]]
    seconds: float
    resumed_from: int = 0
    optimizer: dict[str, Any] = field(default_factory=dict)  # its state, saved with the model


def _fingerprint(
    model_cfg: ModelConfig, train_cfg: TrainConfig, n_items: int, n_events: int
) -> str:
    return f"{model_cfg.model_dump_json()}|{train_cfg.model_dump_json()}|{n_items}|{n_events}"


def train_gru4rec(
    train: pl.DataFrame,
    n_items: int,
    model_config: ModelConfig,
    train_config: TrainConfig,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    epochs: int | None = None,
    on_epoch: EpochCallback | None = None,
    validate: Callable[[GRU4Rec], float] | None = None,
    stop: Callable[[list[dict[str, Any]]], bool] | None = None,
    warm: WarmStart | None = None,
    make: Callable[..., Trainer] = Trainer,  # distributed.py: a data-parallel rank's trainer
) -> TrainResult:
    """Train GRU4Rec on prepared train events (ordered by session start).

    ``epochs`` overrides the config's count (early stopping's refit). ``validate`` returns a
    metric after each epoch (higher is better) that is added to the epoch's record; ``stop``
    ends training early when it returns True for the history so far.
    """
    cfg = train_config
    n_epochs = epochs if epochs is not None else cfg.epochs
    device = resolve_device(cfg.device)
    apply_threads(cfg.threads)  # 0: one core left to the rest of the machine
    torch.manual_seed(cfg.seed)
    data = session_arrays(train)
    if data.n_events == 0:
        raise RecsysError("the train split has no session with at least two clicks to learn from")
    model = GRU4Rec(n_items, model_config, seed=cfg.seed).to(device)
    trainer = make(model, cfg, warm.support if warm else item_support(train, n_items), device)
    if warm is not None:  # yesterday's weights and optimiser state, on today's index
        warm.apply(model, trainer.optimizer, device)
    history: list[dict[str, Any]] = []
    first_epoch = 0
    key = _fingerprint(model_config, cfg, n_items, data.n_events) + (warm.key if warm else "")
    ckpt_path = checkpoint_dir / CHECKPOINT if checkpoint_dir else None
    if resume and ckpt_path is not None and ckpt_path.exists():
        try:
            state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - truncated, tampered or not a checkpoint
            raise RecsysError(
                f"{ckpt_path}: the checkpoint is damaged ({first_line(exc, 120)}); "
                f"remove it or train without --resume"
            ) from None
        if not isinstance(state, dict) or state.get("key") != key:
            raise RecsysError(
                f"{ckpt_path}: the checkpoint was written for another config or dataset; "
                f"remove it or train without --resume"
            )
        trainer.load_checkpoint(state)
        history = list(state["history"])
        first_epoch = int(state["epoch"])
    start = time.perf_counter()
    for epoch in range(first_epoch, n_epochs):
        record = trainer.run_epoch(data, epoch)
        if validate is not None:
            record["valid_metric"] = validate(model)
        history.append(record)
        if ckpt_path is not None and trainer.writes_checkpoints:
            state = trainer.checkpoint_state(epoch + 1, history)
            state["key"] = key
            with atomic_path(ckpt_path) as tmp:
                torch.save(state, tmp)
        if on_epoch is not None:
            on_epoch(record)
        if stop is not None and stop(history):
            break
    model.eval()
    optimizer = state_on(trainer.optimizer.state_dict(), torch.device("cpu"))
    return TrainResult(model, history, time.perf_counter() - start, first_epoch, optimizer)
