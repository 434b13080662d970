"""Where the recurrent model and STAN differ on ``valid``, by the kind of target (issue #13).

    python -m benchmarks.repeat_kinds data/NAME

Reads what ``recsys pipeline`` left in ``data/NAME``: the prepared splits and the GRU4Rec
trained on ``train_tr`` for the fusions (``model/model-train_tr.pt``). Every prediction of
``valid`` is one of three kinds: the item just clicked again, an item clicked earlier in the
session, or an item new to the session. Prints MRR@20 and Recall@20 per kind for that network
(with its readout, if it has one) and for STAN fitted on ``train_tr``; then, for a network with
the repeat readout, the same with its recency weights replaced by a small grid (the last item
weight w0, the earlier ones c·λ^(age-1)): how much a readout of another shape could add. Never
reads ``test``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from recsys.data.preparation import load_prepared
from recsys.evaluation.baselines import make_baseline
from recsys.evaluation.gru4rec import GRU4RecScorer
from recsys.evaluation.harness import prediction_batches, test_sessions
from recsys.evaluation.scorer import SessionScorer

KINDS = ("just clicked", "earlier", "new")
GRID = [(w0, c, lam) for w0 in (1.0, 1.5) for c in (0.5, 0.8) for lam in (0.8, 0.95)]


def target_kinds(sessions: list[np.ndarray]) -> np.ndarray:
    """0, 1 or 2 per prediction, session-major as the ranks."""
    kinds = []
    for s in sessions:
        for t in range(1, len(s)):
            kinds.append(0 if s[t] == s[t - 1] else 1 if s[t] in set(s[:t].tolist()) else 2)
    return np.asarray(kinds)


def ranks(scorer: SessionScorer, sessions: list[np.ndarray]) -> np.ndarray:
    parts = [
        scorer.rank_sessions(b, "conservative", 20)[0] for b in prediction_batches(sessions, 512)
    ]
    return torch.cat(parts).numpy()


def report(label: str, r: np.ndarray, kinds: np.ndarray) -> None:
    rr, hit = np.where(r <= 20, 1.0 / r, 0.0), r <= 20
    per = "  ".join(
        f"{k} {rr[kinds == i].mean():.4f}/{hit[kinds == i].mean():.4f}" for i, k in enumerate(KINDS)
    )
    print(f"{label:<34} MRR@20 {rr.mean():.4f} R@20 {hit.mean():.4f} | {per}", flush=True)


def main(directory: Path) -> None:
    data = load_prepared(directory / "prepared")
    sessions, _, _ = test_sessions(data.split("valid"))
    kinds = target_kinds(sessions)
    shares = " ".join(f"{k} {np.mean(kinds == i):.3f}" for i, k in enumerate(KINDS))
    print(f"valid: {len(kinds):,} predictions; shares: {shares}; per kind: MRR@20/R@20")
    gru = GRU4RecScorer.from_file(directory / "model" / "model-train_tr.pt")
    stan = make_baseline("stan", data.n_items)
    stan.fit(data.split("train_tr"))
    report("gru4rec (train_tr)", ranks(gru, sessions), kinds)
    report("stan (train_tr)", ranks(stan, sessions), kinds)
    readout = gru.model.readout
    if readout is None:
        return
    trained = torch.sigmoid(readout.decay_logit).item()
    print(
        f"readout as trained: lambda {trained:.3f}, tau {readout.log_temperature.exp().item():.3f}"
    )
    for w0, c, lam in GRID:
        weights = torch.tensor([w0] + [c * lam**a for a in range(readout.window - 1)])
        # for this pass, an instance attribute over the method: the grid's weights, not λ^age
        readout.age_weights = lambda n, device, w=weights: w[:n].to(device)  # type: ignore[method-assign]
        report(f"w0 {w0} c {c} lambda {lam}", ranks(gru, sessions), kinds)
    del readout.age_weights  # the trained weights again


if __name__ == "__main__":
    if not sys.argv[1:] or not (Path(sys.argv[1]) / "model" / "model-train_tr.pt").is_file():
        sys.exit("usage: python -m benchmarks.repeat_kinds data/NAME (after recsys pipeline)")
    main(Path(sys.argv[1]))
