"""What every config section shares: unknown keys are errors, and values keep their YAML type.

pydantic's lax mode would read ``epochs: true`` as 1, ``epochs: 2.0`` as 2 and ``exclude_seen: 1``
as true; a config is a file people type, so those are errors here. Numbers still accept quoted
text such as ``1e-3``, which YAML 1.1 reads as a string.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from recsys.core.metrics import parse_metric


class Section(BaseModel):
    """A config section: frozen, and every key it does not know is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _not_a_flag(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {str(value).lower()}")
    return value


def _metric(text: str) -> str:
    parse_metric(text)  # the ValueError names what is accepted
    return text


Int = Annotated[int, Field(strict=True)]  # no bool, no float, no text
Flag = Annotated[bool, Field(strict=True)]  # true / false only
Float = Annotated[float, BeforeValidator(_not_a_flag)]  # int, float or numeric text, no bool
FiniteFloat = Annotated[Float, Field(allow_inf_nan=False)]
# A ranking metric at a cut-off, spelt as evaluation reports it (recsys.core.metrics).
MetricName = Annotated[str, AfterValidator(_metric)]
