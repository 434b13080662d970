"""Data-parallel training with torch.distributed: N replicas of one model, each on its own
share of the session-parallel slots, kept bit-identical.

Why this shape: GRU4Rec's step is tiny and row-sparse, so a replica must never drift. Every
rank owns a round-robin share of the sessions (session k goes to rank k mod N) and
``batch_size // N`` slots (the first ``batch_size % N`` ranks one more). Per step the ranks

1. know every rank's slot input and target ids without a message: the batching is
   deterministic, so each rank replays the others' (cheap index work). Every rank scores its
   own slots against *all* targets of the step (the in-batch negatives of the one-process
   run) plus the shared samples, and every rank gathers the same set of touched item rows;
2. draw the same shared negative samples (the sample store's generator is seeded alike);
3. all-reduce (sum) one flat buffer, the step's only collective: the dense GRU gradients
   and the gradients of the touched item rows. Each rank divides its loss by the *global* ``train.batch_size``, so the summed
   gradient has the loss scale of the one-process run and the same learning rate works;
4. apply the identical dense and row-sparse Adagrad update (``RowAdagradM``) everywhere.

Ranks whose share ran out take part with zero slots until every rank is done. Dropout masks
come from each rank's own torch generator (seed + rank * 1,000,003); their states go into the checkpoint,
which rank 0 alone writes (atomically), so a resumed N-process run equals an uninterrupted
one. After every epoch the ranks compare a digest of their weights and optimiser state.

Launching the ranks (``train.nproc``, torchrun): recsys/training/launch.py.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from recsys.core.errors import RecsysError
from recsys.data.batching import SessionArrays, Step, session_parallel_batches
from recsys.model.matmul import linear
from recsys.training.leaves import apply_updates, step_rows
from recsys.training.trainer import Trainer

_RANK_SEED = 1_000_003  # rank r's dropout generator starts at seed + r * this


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel ranks."""

    rank: int
    size: int
    local_rank: int  # among the ranks of this machine: its GPU
    local_size: int


def local_slots(batch_size: int, rank: int, size: int) -> int:
    """Rank ``rank``'s share of the ``batch_size`` slots (the first ranks take the remainder)."""
    return batch_size // size + (1 if rank < batch_size % size else 0)


def session_share(data: SessionArrays, rank: int, size: int) -> SessionArrays:
    """The trainable sessions (two clicks or more) of rank ``rank``: every ``size``-th one in
    start order, so each rank's share spans the whole period, as the one-process run does."""
    lengths = np.diff(data.offsets)
    order = np.flatnonzero(lengths >= 2)[rank::size]
    sizes = lengths[order]
    offsets = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
    index = np.repeat(data.offsets[order] - offsets[:-1], sizes) + np.arange(offsets[-1])
    return SessionArrays(data.items[index], offsets)


def replica_digest(trainer: Trainer) -> str:
    """A digest of everything that must be equal on every rank: weights, optimiser state and
    the shared sample store's position."""
    digest = hashlib.blake2b(digest_size=16)
    tensors = dict(trainer.model.state_dict())
    for group, states in sorted(trainer.optimizer.state_dict().items()):
        tensors.update({f"{group}.{k}": v for k, v in states.items()})
    for name in sorted(tensors):
        value = tensors[name].detach().to("cpu").contiguous().reshape(-1)
        digest.update(name.encode())
        digest.update(value.view(torch.uint8).numpy().tobytes())
    digest.update(str(trainer.sampler.state()["next"]).encode())
    return digest.hexdigest()


@dataclass
class ParallelTrainer(Trainer):
    """A ``Trainer`` whose steps span all ranks (the module docstring says how)."""

    world: World = field(kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        world = self.world
        self.writes_checkpoints = world.rank == 0
        torch.manual_seed(self.config.seed + world.rank * _RANK_SEED)  # own dropout masks
        self.comm = self.device if self.device.type == "cuda" else torch.device("cpu")
        self.slots = local_slots(self.config.batch_size, world.rank, world.size)
        self.shared: tuple[SessionArrays, list[SessionArrays]] | None = None  # every share
        self.step_ids: tuple[torch.Tensor, torch.Tensor] = (torch.empty(0), torch.empty(0))
        self.rng_states: list[Any] = []

    def batches(self, data: SessionArrays, batch_size: int) -> Iterator[Step]:  # type: ignore[override]
        """This rank's steps (``data`` is its share), empty ones once its share is done, until
        every rank's is. The other ranks' slot ids come from replaying their batching here
        (it is deterministic), so no ids cross the wire: one collective per step."""
        assert self.shared is not None
        rank, size = self.world.rank, self.world.size
        none = np.empty(0, dtype=np.int64)
        done = Step(none, none, np.empty(0, dtype=bool), none, none)
        every = [
            session_parallel_batches(share, local_slots(self.config.batch_size, r, size))
            for r, share in enumerate(self.shared[1])
        ]
        order = [(rank + i) % size for i in range(size)]  # this rank's own slots first
        first = True
        while True:
            now = [next(steps, done) for steps in every]
            if all(len(s.targets) == 0 for s in now):
                return
            ins = np.concatenate([now[r].inputs for r in order])
            outs = np.concatenate([now[r].targets for r in order])
            self.step_ids = (
                torch.from_numpy(ins).to(self.device),
                torch.from_numpy(outs).to(self.device),
            )
            step = now[rank]
            if first:  # the loop opened min(batch_size, sessions) slots: keep this rank's
                step = Step(step.inputs, step.targets, step.reset, np.arange(len(step.targets)))
                first = False
            yield step

    def train_step(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        hidden: list[torch.Tensor],
        history: torch.Tensor | None = None,
        held: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One global step: this rank's slots against every rank's targets and the shared
        samples, gradients summed over the ranks, the same update on every replica."""
        model = self.model
        all_inputs, all_targets = self.step_ids
        b = len(targets)
        samples = self.sampler.draw()  # the same draw on every rank
        out_idx = torch.cat((all_targets, samples))  # this rank's targets first
        leaves = step_rows(model, all_inputs, out_idx)  # the same rows on every rank
        loss = torch.zeros((), device=self.device)
        if b:
            out, hidden = model.step(leaves.x[:b], hidden, True, self.bf16, self.kernels)
            distinct = linear(out, leaves.item_rows, leaves.bias_rows, self.bf16)
            scores = distinct.index_select(1, leaves.out_inv)  # (b, all targets + samples)
            loss = self._loss(scores, out_idx, len(all_targets)) / self.config.batch_size
            loss.backward()
        tensors = [*model.dense_parameters(), leaves.item_rows, leaves.bias_rows]
        if leaves.in_table is not None:
            tensors.append(leaves.in_table)
        grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in tensors]
        flat = torch.cat([g.reshape(-1) for g in grads]).to(self.comm)
        dist.all_reduce(flat)  # sum: each rank's loss is already over the global batch size
        flat = flat.to(self.device)
        start = 0
        for t in tensors:
            t.grad = flat[start : start + t.numel()].view_as(t)
            start += t.numel()
        apply_updates(self.optimizer, model, leaves)
        return loss.detach(), [h.detach() for h in hidden]

    def run_epoch(self, data: SessionArrays, epoch: int, label: str = "train") -> dict[str, Any]:
        """The epoch on this rank's share; the record holds the loss and events of all ranks,
        and the replicas are checked to be identical."""
        if self.shared is None or self.shared[0] is not data:
            shares = [session_share(data, r, self.world.size) for r in range(self.world.size)]
            self.shared = (data, shares)
        record = super().run_epoch(self.shared[1][self.world.rank], epoch, label)
        sums = torch.tensor(
            [record["loss"] * record["events"], float(record["events"])], dtype=torch.float64
        ).to(self.comm)
        dist.all_reduce(sums)
        loss_sum, events = sums.cpu().tolist()
        record["loss"] = loss_sum / max(events, 1.0)
        record["events"] = int(events)
        record["events_per_second"] = events / record["seconds"] if record["seconds"] else 0.0
        record["processes"] = self.world.size
        digests: list[Any] = [None] * self.world.size
        dist.all_gather_object(digests, replica_digest(self))
        if len(set(digests)) != 1:
            raise RecsysError(
                f"data-parallel replicas diverged after epoch {epoch + 1} (digests {digests}); "
                f"the collective backend summed unequally: train with train.nproc 1"
            )
        self.rng_states = [None] * self.world.size
        dist.all_gather_object(self.rng_states, self._own_rng())
        return record

    def _own_rng(self) -> dict[str, Any]:
        cuda = torch.cuda.get_rng_state() if self.device.type == "cuda" else None
        return {"cpu": torch.get_rng_state(), "cuda": cuda}

    def checkpoint_state(self, epoch: int, history: list[dict[str, Any]]) -> dict[str, Any]:
        state = super().checkpoint_state(epoch, history)
        state["rank_rng"] = self.rng_states  # every rank's dropout generator
        return state

    def load_checkpoint(self, state: dict[str, Any]) -> None:
        super().load_checkpoint(state)
        own = state["rank_rng"][self.world.rank]
        torch.set_rng_state(own["cpu"])
        if own["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(own["cuda"])
