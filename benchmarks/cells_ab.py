"""Setting (a)'s training step for each ``model.cell``, alternated in one process.

``make bench``'s rows run one cell after the other, minutes apart; on a shared machine the load
changes between them more than the cells differ. Here the cells take turns (``STEPS`` real
``Trainer.train_step`` calls each per turn, on the same batches of the Diginetica train split),
so every turn compares them under the same load; the ratio per turn is against the GRU.

    python -m benchmarks.cells_ab [--threads 1] [--turns 14] [--cells gru,lstm,rnn]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.train import load_train, settings
from recsys.data.batching import Step, session_arrays, session_parallel_batches
from recsys.model.gru4rec import GRU4Rec
from recsys.training.trainer import Trainer, item_support, reset_slots

STEPS = 40  # per cell per turn
BATCHES = 400  # the first steps of the epoch, reused in a cycle


class _Run:
    """One cell's trainer and where it is in the shared batches."""

    def __init__(self, trainer: Trainer, batches: list[Step]) -> None:
        self.trainer = trainer
        self.batches = batches
        self.hidden = trainer.model.init_hidden(trainer.config.batch_size)
        self.pos = 0

    def seconds_per_step(self, steps: int) -> float:
        cpu = torch.device("cpu")
        start = time.perf_counter()
        for _ in range(steps):
            step = self.batches[self.pos % len(self.batches)]
            self.pos += 1
            if step.keep is not None:
                self.hidden = [h.index_select(0, torch.from_numpy(step.keep)) for h in self.hidden]
            if step.reset.any():
                self.hidden = reset_slots(self.hidden, step.reset, cpu)
            if len(step.targets) != len(self.hidden[0]):  # the cycle starts again
                self.hidden = self.trainer.model.init_hidden(len(step.targets))
            _, self.hidden = self.trainer.train_step(
                torch.from_numpy(step.inputs), torch.from_numpy(step.targets), self.hidden
            )
        return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--turns", type=int, default=14)
    parser.add_argument("--cells", default="gru,lstm,rnn")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cells = args.cells.split(",")
    data, origin = load_train()
    model_cfg, train_cfg = settings()["a: 100 units, batch 32, XE+logQ"]
    batches: list[Step] = []
    for step in session_parallel_batches(session_arrays(data.train), train_cfg.batch_size):
        batches.append(step)
        if len(batches) >= BATCHES:
            break
    support = item_support(data.train, data.n_items)
    runs: dict[str, _Run] = {}
    for cell in cells:
        torch.manual_seed(0)
        model = GRU4Rec(data.n_items, model_cfg.model_copy(update={"cell": cell}), seed=0)
        runs[cell] = _Run(Trainer(model, train_cfg, support, torch.device("cpu")), batches)
        runs[cell].seconds_per_step(20)  # warm-up: fills the sample store, allocations
    times: dict[str, list[float]] = {cell: [] for cell in cells}
    for _ in range(args.turns):
        for cell in cells:
            times[cell].append(runs[cell].seconds_per_step(STEPS))
    print(f"{origin}, setting (a), {args.threads} thread(s), {args.turns} turns of {STEPS} steps")
    base = times[cells[0]]
    for cell in cells:
        ratios = [b / t for b, t in zip(base, times[cell], strict=True)]
        print(
            f"{cell}: {statistics.median(times[cell]) * 1e3:.2f} ms/step, events/s vs "
            f"{cells[0]} {statistics.median(ratios):.2f} (turns {min(ratios):.2f}-{max(ratios):.2f})"
        )


if __name__ == "__main__":
    main()
