"""Truncated backpropagation through time inside the session-parallel scheme (``train.bptt: k``).

GRU4Rec backpropagates each step's loss through that step only (``k = 1``). With ``k > 1``
the gradient of step t is exact for this definition:

- the window of step t is steps ``a .. t`` with ``a = max(t - k + 1, the epoch's first step)``;
  it starts from the state that entered step a as training carried it (detached: the
  truncation);
- the window is recomputed with the weights as they are at step t: for s = a .. t, apply step
  s's ``keep`` (slots that survive) and ``reset`` (slots that start a session: their state is
  multiplied by 0) to the state, then run the model's own ``step`` on step s's inputs, with
  step s's dropout masks (the random state is replayed, so a step draws the same masks in every
  window it is part of);
- the loss of step t is read from the last output and backpropagated through the whole window:
  a slot's loss reaches back ``min(k, steps since its session started)`` steps (a reset cuts
  it), the dense weights get ∂L_t/∂θ through every step, and every item row read as an input
  anywhere in the window (or scored at step t) gets its gradient, row-sparse as in a 1-step run;
- the state carried to step t + 1 is the window's last one.

Recomputing instead of keeping old graphs keeps the gradient that of the current weights (the
optimiser changes them in place after every step) and holds at most k steps of graph and k
states per slot: memory is bounded by k, and a step costs about k recurrent steps forward and
backward (the scoring, the loss and the updates stay one per step). There is no padding: a
window is the steps the slots really took.

Every ``GRAD_EVERY`` steps the window also measures the vanishing gradient: the mean over slots
of ‖∂L_t/∂h_{t-j}‖ for j = 0 .. k-1, where h is the last layer's output (for the LSTM: its h,
with its memory cell c held fixed), read at lag 0 where the loss reads it and at lag j > 0
where step t-j+1 reads it, and a slot counts at lag j only if its session reaches back j steps (the mean is of the loss as
trained, summed over the batch and divided by the batch size).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

GRAD_EVERY = 10  # steps between two gradient-norm measurements
LAG_PREFIX = "grad_norm_lag_"  # the epoch record's (and MLflow's) key for lag j: + str(j)
LAG_METRIC = LAG_PREFIX + "{}"

Hidden = list[torch.Tensor]
StepFn = Callable[[torch.Tensor, Hidden], tuple[torch.Tensor, Hidden]]


def reset_slots(hidden: Hidden, reset: np.ndarray, device: torch.device) -> Hidden:
    """Zero the hidden state of slots that start a new session (a multiply, not a scatter:
    in a window it is also what cuts the gradient at the session's start)."""
    keep = torch.from_numpy(~reset).to(device=device, dtype=torch.float32).unsqueeze(1)  # (B, 1)
    return [h * keep for h in hidden]


@dataclass
class _Step:
    inputs: torch.Tensor  # (B_s,) item indices
    keep: torch.Tensor | None  # rows of the previous step's slots that survive, or None
    reset: np.ndarray  # (B_s,) bool: the slot starts a session here
    entering: Hidden  # detached state that entered this step (after keep and reset)
    rng: torch.Tensor  # torch's CPU random state before this step's draws
    cuda_rng: torch.Tensor | None


class BpttWindow:
    """The last k steps of an epoch and their recomputation (see the module docstring)."""

    def __init__(self, k: int, device: torch.device) -> None:
        self.k = k
        self.device = device
        self.steps: deque[_Step] = deque(maxlen=k)
        self.states: list[torch.Tensor] = []
        self.count = 0
        self.measuring = False
        self.norm_sum = torch.zeros(k, dtype=torch.float64, device=device)
        self.norm_n = torch.zeros(k, dtype=torch.float64, device=device)

    def clear(self) -> None:
        """A new epoch: the hidden state starts from zero, so does the window."""
        self.steps.clear()
        self.states = []
        self.count = 0
        self.norm_sum.zero_()
        self.norm_n.zero_()

    def push(
        self,
        inputs: torch.Tensor,
        keep: np.ndarray | None,
        reset: np.ndarray,
        entering: Hidden,
    ) -> None:
        """Record step t before it runs: its inputs, how the slots changed, its entering state."""
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        keep_t = None if keep is None else torch.from_numpy(keep).to(self.device)
        detached = [h.detach() for h in entering]
        self.steps.append(_Step(inputs, keep_t, reset, detached, torch.get_rng_state(), cuda))
        self.measuring = self.count % GRAD_EVERY == 0
        self.count += 1

    def inputs(self) -> torch.Tensor:
        """The window's inputs, oldest step first: the item rows the step must gather."""
        return torch.cat([s.inputs for s in self.steps])

    def forward(self, x: torch.Tensor, step: StepFn) -> tuple[torch.Tensor, Hidden]:
        """Run the window from its detached start with the current weights; ``x`` holds the
        input rows of ``inputs()``. Returns the last step's output and state."""
        hidden = self.steps[0].entering
        offset = 0
        self.states = []
        for i, s in enumerate(self.steps):
            if i:
                if s.keep is not None:
                    hidden = [h.index_select(0, s.keep) for h in hidden]
                if s.reset.any():
                    hidden = reset_slots(hidden, s.reset, self.device)
            torch.set_rng_state(s.rng)  # the step's own dropout masks, in every window
            if s.cuda_rng is not None:
                torch.cuda.set_rng_state(s.cuda_rng, self.device)
            n = len(s.inputs)
            out, hidden = step(x[offset : offset + n], hidden)
            offset += n
            # h of the last layer: the state the next step reads, and at step t the output the
            # loss reads (an LSTM's state also holds its memory cell, an output dropout a copy)
            state = out if i == len(self.steps) - 1 else hidden[-1]
            if self.measuring and state.requires_grad:
                state.retain_grad()
            self.states.append(state)
        return out, hidden

    def measure(self, held: torch.Tensor | None = None) -> None:
        """After ``backward``: add ‖∂L_t/∂h_{t-j}‖ of the slots the loss reaches at each lag.
        ``held``: step t's slots whose loss is not the network's (the readout's holdout)."""
        if not self.measuring:
            self.states = []
            return
        last = len(self.states) - 1
        alive = torch.ones(len(self.states[last]), dtype=torch.bool, device=self.device)
        if held is not None:
            alive = alive & ~held
        for j in range(len(self.states)):
            s = last - j
            if j:  # map the slots alive after step s + 1 back onto step s's rows
                nxt = self.steps[s + 1]
                carried = alive & ~torch.from_numpy(nxt.reset).to(self.device)
                if nxt.keep is None:
                    alive = carried
                else:
                    alive = torch.zeros(len(self.states[s]), dtype=torch.bool, device=self.device)
                    alive[nxt.keep] = carried
            grad = self.states[s].grad
            width = self.states[last].shape[-1]  # h: a state's trailing columns
            norms = (
                grad[:, -width:].norm(dim=1).double()
                if grad is not None
                else torch.zeros(len(alive), dtype=torch.float64, device=self.device)
            )
            self.norm_sum[j] += (norms * alive).sum()
            self.norm_n[j] += alive.sum()
        self.states = []  # the graph is freed with them

    def epoch_norms(self) -> dict[str, float]:
        """The epoch's mean gradient norm per lag (one host transfer), as record keys."""
        sums, counts = self.norm_sum.cpu().tolist(), self.norm_n.cpu().tolist()
        return {
            LAG_METRIC.format(j): s / n
            for j, (s, n) in enumerate(zip(sums, counts, strict=True))
            if n > 0
        }
