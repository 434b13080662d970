"""Embedded default dataset: a synthetic click log that behaves like real e-commerce sessions.

The pipeline must run end to end without downloading anything, and its models must have
something real to learn. So the generator is not uniform noise: item popularity follows a power
law, each session is driven by a latent intent (a topic with its own items), and within an
intent items have a few preferred, *directed* successors (a -> b often, b -> a rarely). A
last-item or recurrent model can learn those transitions; popularity and co-occurrence capture
them only in part. Session lengths, repeat clicks, a daily traffic cycle and lognormal
think-times between clicks make the preparation steps (de-duplication, length and support
filters, time split) do real work. Optional revisits (a click back to an item seen earlier in
the session) make repeat-heavy logs, where the session's own items are the best guess.

Everything is vectorised with numpy over sessions; the only Python loop is over click positions
(at most ``max_session_length`` steps, each touching only the sessions still running).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from recsys.config.synthetic import SyntheticConfig
from recsys.data.schema import ITEM, SESSION, TIME, TIME_DTYPE

# Raw item ids are drawn from this range: 6-7 digit numbers, deliberately not 0..n-1.
_ITEM_ID_LOW = 100_000
_ITEM_ID_HIGH = 10_000_000
# Hour of day (UTC) when traffic peaks; the trough is 12 hours away.
_PEAK_HOUR = 20.0
_MS_PER_DAY = 86_400_000


@dataclass(frozen=True)
class _IntentSampler:
    """Draws items from one intent with given weights, for many sessions at once.

    Items are laid out grouped by intent with one global cumulative weight array, so a draw for
    intent k is a uniform number inside k's slice of that array followed by one searchsorted.
    """

    order: np.ndarray  # item indices grouped by intent
    cum: np.ndarray  # cumulative weights along `order`
    lo: np.ndarray  # per intent: cumulative weight before its slice
    mass: np.ndarray  # per intent: total weight of its items

    @classmethod
    def build(cls, weights: np.ndarray, intent_of: np.ndarray, n_intents: int) -> _IntentSampler:
        order = np.argsort(intent_of, kind="stable")
        cum = np.cumsum(weights[order])
        mass = np.bincount(intent_of, weights=weights, minlength=n_intents)
        lo = np.concatenate(([0.0], np.cumsum(mass)[:-1]))
        return cls(order, cum, lo, mass)

    def draw(self, intents: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        u = self.lo[intents] + rng.random(len(intents)) * self.mass[intents]
        pos = np.searchsorted(self.cum, u, side="right")
        return self.order[np.minimum(pos, len(self.order) - 1)]


def _start_times_ms(config: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """Session start offsets (ms from ``start``), sorted, following a daily traffic wave."""
    span_ms = config.days * _MS_PER_DAY
    n_minutes = max(1, int(np.ceil(span_ms / 60_000)))
    minute = np.arange(n_minutes)
    hour = (minute % 1440) / 60.0 + config.start.hour + config.start.minute / 60.0
    density = 1.0 + config.daily_cycle * np.cos(2 * np.pi * (hour - _PEAK_HOUR) / 24.0)
    # the last minute may be partial: weight it by the part inside the span
    density[-1] *= (span_ms - (n_minutes - 1) * 60_000) / 60_000
    cdf = np.cumsum(density)
    u = rng.random(config.n_sessions) * cdf[-1]
    picked = np.minimum(np.searchsorted(cdf, u, side="right"), n_minutes - 1)
    ms = (picked + rng.random(config.n_sessions)) * 60_000
    return np.sort(np.minimum(ms, span_ms - 1).astype(np.int64))


def _session_lengths(config: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """Clicks per session: ceil of a lognormal, so median ~3-4, a long tail, and 1s exist."""
    raw = rng.lognormal(
        np.log(config.session_length_median), config.session_length_sigma, config.n_sessions
    )
    return np.clip(np.ceil(raw), 1, config.max_session_length).astype(np.int64)


def _successor_table(
    config: SyntheticConfig,
    sampler: _IntentSampler,
    intent_of: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Each item's preferred successors, drawn from its own intent and never the item itself.

    Drawn independently per item, so b being a successor of a says almost nothing about a being a
    successor of b: the transitions are directed.
    """
    n, k = config.n_items, config.n_successors
    owner = np.repeat(np.arange(n), k)
    succ = sampler.draw(intent_of[owner], rng)
    for _ in range(5):  # redraw self-loops; intents with one item keep them (handled below)
        bad = np.flatnonzero(succ == owner)
        if bad.size == 0:
            break
        succ[bad] = sampler.draw(intent_of[owner[bad]], rng)
    bad = np.flatnonzero(succ == owner)
    succ[bad] = (owner[bad] + 1 + rng.integers(0, n - 1, bad.size)) % n
    return succ.reshape(n, k)


def _earlier_items(
    items: np.ndarray, start: np.ndarray, t: int, decay: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """For sessions at click position ``t`` (``start``: their first row), an item clicked before
    the previous click, and whether there was one.

    Position ``j`` is drawn with weight ``decay ** (t - 1 - j)`` (recency: the click two back
    weighs most) among the positions whose item is not the previous click's, so the revisit is
    never a consecutive duplicate; an item clicked twice weighs twice. Weights are taken relative
    to each session's nearest eligible click, so a long run of one item cannot underflow them.
    """
    window = items[start[:, None] + np.arange(t)]  # positions 0..t-1; t-1 is the previous click
    eligible = window[:, :-1] != window[:, -1:]
    found = eligible.any(axis=1)
    eligible = eligible[found]
    distance = np.arange(t - 1, 0, -1)  # clicks back from the previous one: t-1 .. 1
    nearest = np.where(eligible, distance, t).min(axis=1, keepdims=True)
    cum = np.cumsum(np.where(eligible, decay ** np.maximum(distance - nearest, 0), 0.0), axis=1)
    total = cum[:, -1]
    u = np.minimum(rng.random(len(total)) * total, np.nextafter(total, 0))
    picked = (cum <= u[:, None]).sum(axis=1)  # first position whose cumulative weight exceeds u
    return window[found, :-1][np.arange(len(picked)), picked], found


def generate_clicks(config: SyntheticConfig) -> pl.DataFrame:
    """The synthetic click log: ``session_id``, ``item_id`` (raw ids), ``timestamp`` (ms, UTC).

    Sorted by session and time; session ids increase with session start time. Deterministic in
    ``config`` (all randomness comes from one generator seeded with ``config.seed``).
    """
    rng = np.random.default_rng(config.seed)
    n_items, n_sessions = config.n_items, config.n_sessions

    # Items: index = popularity rank; raw ids random and unrelated to rank.
    item_ids = rng.choice(_ITEM_ID_HIGH - _ITEM_ID_LOW, n_items, replace=False) + _ITEM_ID_LOW
    popularity = np.arange(1, n_items + 1, dtype=np.float64) ** -config.popularity_exponent
    pop_cum = np.cumsum(popularity)
    # Every intent gets at least one item; the rest are spread at random.
    intent_of = np.concatenate(
        (np.arange(config.n_intents), rng.integers(0, config.n_intents, n_items - config.n_intents))
    )
    rng.shuffle(intent_of)
    in_intent = _IntentSampler.build(popularity, intent_of, config.n_intents)
    succ_sampler = _IntentSampler.build(
        popularity**config.successor_popularity_exponent, intent_of, config.n_intents
    )
    successors = _successor_table(config, succ_sampler, intent_of, rng)
    succ_cdf = np.cumsum(config.successor_decay ** np.arange(config.n_successors))
    succ_cdf /= succ_cdf[-1]

    def popular(m: int) -> np.ndarray:
        pos = np.searchsorted(pop_cum, rng.random(m) * pop_cum[-1], side="right")
        return np.minimum(pos, n_items - 1)

    # Sessions: start times (sorted -> ids follow time), lengths, initial intents.
    start_ms = _start_times_ms(config, rng)
    lengths = _session_lengths(config, rng)
    offsets = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    n_events = int(lengths.sum())
    intent = intent_of[popular(n_sessions)]  # intents are as popular as their items

    items = np.empty(n_events, dtype=np.int64)
    items[offsets] = in_intent.draw(intent, rng)
    # Process positions in order; sorting sessions by length makes the live ones a prefix.
    by_length = np.argsort(-lengths, kind="stable")
    live_count = np.searchsorted(-lengths[by_length], -np.arange(1, lengths.max()), side="left")
    p_repeat, p_revisit = config.repeat_prob, config.revisit_prob
    for t, n_live in enumerate(live_count, start=1):
        live = by_length[:n_live]
        pos = offsets[live] + t
        prev = items[pos - 1]
        switch = rng.random(n_live) < config.intent_switch_prob
        intent[live[switch]] = intent_of[popular(int(switch.sum()))]
        # One uniform splits the click: [0, repeat) repeat, [repeat, repeat + revisit) revisit,
        # the rest a fresh click; each part rescaled to [0, 1) is the uniform of what follows.
        r = rng.random(n_live)
        is_repeat = r < p_repeat
        u = (r - p_repeat - p_revisit) / (1 - p_repeat - p_revisit)
        nxt = prev.copy()
        fresh = ~is_repeat
        back = np.flatnonzero(fresh & (r < p_repeat + p_revisit))  # empty when p_revisit == 0
        if back.size:
            # Without an earlier item other than the previous one, a revisit is a fresh click.
            u[back] = (r[back] - p_repeat) / p_revisit
            if t >= 2:
                earlier, found = _earlier_items(
                    items, offsets[live[back]], t, config.revisit_decay, rng
                )
                nxt[back[found]] = earlier
                fresh[back[found]] = False
        follow = fresh & (u < config.transition_prob)
        jump = fresh & ~follow & (u < config.transition_prob + config.intent_jump_prob)
        wander = fresh & ~follow & ~jump
        k = np.searchsorted(succ_cdf, rng.random(int(follow.sum())), side="right")
        nxt[follow] = successors[prev[follow], np.minimum(k, config.n_successors - 1)]
        nxt[jump] = in_intent.draw(intent[live[jump]], rng)
        nxt[wander] = popular(int(wander.sum()))
        items[pos] = nxt

    # Think-times: lognormal, at least one second, so times strictly increase within a session.
    gaps = np.maximum(
        rng.lognormal(np.log(config.gap_median_seconds * 1000), config.gap_sigma, n_events), 1000
    ).astype(np.int64)
    gaps[offsets] = 0
    within = np.cumsum(gaps)
    within -= np.repeat(within[offsets], lengths)
    session_index = np.repeat(np.arange(n_sessions), lengths)
    epoch_ms = int(config.start.timestamp() * 1000)
    times = epoch_ms + np.repeat(start_ms, lengths) + within

    return pl.DataFrame(
        {
            SESSION: pl.Series(SESSION, session_index + 1, dtype=pl.Int64),
            ITEM: pl.Series(ITEM, item_ids[items], dtype=pl.Int64),
            TIME: pl.Series(TIME, times, dtype=pl.Int64).cast(pl.Datetime("ms")),
        }
    ).with_columns(pl.col(TIME).dt.replace_time_zone("UTC").cast(TIME_DTYPE))
