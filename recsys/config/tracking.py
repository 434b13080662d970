"""The ``tracking:`` section: what the pipeline records in MLflow beyond params, metrics and files.

No step's cache key reads it, so switching it changes what is logged, never what is computed.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from recsys.config.fields import FiniteFloat, Flag, Section


class TrackingConfig(Section):
    # CPU and memory while the model trains, as the run's system metrics (needs psutil)
    system_metrics: Flag = True
    # seconds between two samples; MLflow's own monitor also samples every 10 s
    system_metrics_interval: Annotated[FiniteFloat, Field(gt=0)] = 10.0
