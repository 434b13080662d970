"""Knobs of the embedded synthetic click log (the generator is ``recsys.data.synthetic``).

A config section like every other, so it lives with the config and is validated on load.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class SyntheticConfig(BaseModel):
    """Knobs of the synthetic click log; the defaults give about 200k clicks in 28 days."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: Annotated[int, Field(ge=0)] = 0  # RNG seed: same seed, identical log
    n_items: Annotated[int, Field(ge=2, le=1_000_000)] = 10_000  # catalogue size (random raw ids)
    n_sessions: Annotated[int, Field(ge=1)] = 40_000  # sessions to generate (~5 clicks each)
    n_intents: Annotated[int, Field(ge=1)] = 50  # latent intents; each item belongs to one
    intent_switch_prob: Annotated[float, Field(ge=0, le=1)] = 0.05  # per click: new intent
    days: Annotated[float, Field(gt=0)] = 28.0  # session start times spread over this many days
    start: datetime = datetime(2024, 3, 4, tzinfo=UTC)  # first possible session start (naive = UTC)
    daily_cycle: Annotated[float, Field(ge=0, le=1)] = 0.6  # amplitude of the daily traffic wave
    popularity_exponent: Annotated[float, Field(ge=0)] = 0.8  # Zipf exponent of item popularity
    session_length_median: Annotated[float, Field(gt=0)] = 2.8  # lognormal median; length = ceil
    session_length_sigma: Annotated[float, Field(ge=0)] = 1.0  # lognormal sigma: tail heaviness
    max_session_length: Annotated[int, Field(ge=1, le=10_000)] = 200  # hard cap on clicks/session
    transition_prob: Annotated[float, Field(ge=0, le=1)] = 0.55  # non-repeat: last item's successor
    intent_jump_prob: Annotated[float, Field(ge=0, le=1)] = 0.3  # non-repeat: item of the intent
    # (the rest, 1 - transition_prob - intent_jump_prob: a globally popular item, any intent)
    n_successors: Annotated[int, Field(ge=1, le=100)] = 5  # preferred successors per item
    successor_decay: Annotated[float, Field(gt=0, le=1)] = 0.6  # weight ratio of successor k+1 to k
    successor_popularity_exponent: Annotated[float, Field(ge=0)] = 0.5  # successors ~ pop**this
    repeat_prob: Annotated[float, Field(ge=0, lt=1)] = 0.06  # per click: repeat the previous item
    # per click: return to an item clicked earlier in the session, not the previous one
    revisit_prob: Annotated[float, Field(ge=0, lt=1)] = 0.0
    revisit_decay: Annotated[float, Field(gt=0, le=1)] = 0.7  # weight ratio, one click further back
    gap_median_seconds: Annotated[float, Field(gt=0)] = 40.0  # median think-time between clicks
    gap_sigma: Annotated[float, Field(ge=0)] = 1.2  # lognormal sigma of think-times

    @field_validator("start")
    @classmethod
    def _utc(cls, v: datetime) -> datetime:
        return v.replace(tzinfo=UTC) if v.tzinfo is None else v.astimezone(UTC)

    @model_validator(mode="after")
    def _check(self) -> SyntheticConfig:
        if self.transition_prob + self.intent_jump_prob > 1 + 1e-12:
            raise ValueError("transition_prob + intent_jump_prob must be at most 1")
        if self.repeat_prob + self.revisit_prob >= 1:
            # the other clicks (successor, intent, popular) need some probability left
            raise ValueError("repeat_prob + revisit_prob must be below 1")
        if self.n_intents > self.n_items:
            raise ValueError("n_intents must not exceed n_items (every intent needs an item)")
        return self
