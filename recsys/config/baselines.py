"""The baselines of a config: each kind with its typed parameters, checked when the config loads.

``BASELINE_PARAMS`` is the one list of baseline kinds: the config accepts these kinds, runs all
of them by default (in this order), and ``recsys.evaluation.baselines`` builds one class per
kind. The defaults and ranges are those of the papers and session-rec (see each class there).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from recsys.config.fields import FiniteFloat, Int, Section

PositiveInt = Annotated[Int, Field(ge=1)]
Positive = Annotated[FiniteFloat, Field(gt=0)]
NonNegative = Annotated[FiniteFloat, Field(ge=0)]


class _Params(Section):
    """Parameters of one baseline kind; an unknown one is an error that lists the accepted ones."""

    @model_validator(mode="before")
    @classmethod
    def _known(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(str(k) for k in set(data) - set(cls.model_fields))
            if unknown:
                accepted = ", ".join(cls.model_fields) or "none"
                raise ValueError(f"unknown parameter(s) {unknown}; accepted parameters: {accepted}")
        return data


class NoParams(_Params):
    """POP and S-POP have no parameters."""


class ItemKNNParams(_Params):
    n_sims: PositiveInt = 100  # most similar items kept per item
    lmbd: NonNegative = 20.0  # support damping: rare items' incidental co-occurrences weigh less
    alpha: Annotated[NonNegative, Field(le=1)] = 0.5  # support exponent split; 0.5 = cosine


class SequentialRulesParams(_Params):
    steps: PositiveInt = 10  # a rule a -> b for every b up to this many clicks after a
    weighting: Literal["div", "same", "quadratic"] = "div"  # 1/d, 1, 1/d^2 at distance d
    pruning: Annotated[Int, Field(ge=0)] = 20  # heaviest rules kept per item; 0 keeps all


class VSKNNParams(_Params):
    k: PositiveInt = 100  # neighbour sessions
    sample_size: PositiveInt = 500  # most recent candidate sessions compared
    weighting: Literal["div", "same"] = "div"  # prefix item weight: linear decay or 1
    weighting_score: Literal["div", "same"] = "div"  # neighbour item weight: 1/distance or 1


class STANParams(_Params):
    k: PositiveInt = 500
    sample_size: PositiveInt = 5000
    # The three decays; None switches a factor off.
    lambda_spw: Positive | None = 1.02  # position of the item in the prefix
    lambda_snh: Positive | None = 5.0  # neighbour session recency, in days
    lambda_inh: Positive | None = 2.05  # distance of the item to the match in the neighbour


BaselineParams = NoParams | ItemKNNParams | SequentialRulesParams | VSKNNParams | STANParams

BASELINE_PARAMS: dict[str, type[_Params]] = {
    "pop": NoParams,
    "spop": NoParams,
    "iknn": ItemKNNParams,
    "sr": SequentialRulesParams,
    "vsknn": VSKNNParams,
    "stan": STANParams,
}
BASELINE_KINDS = tuple(BASELINE_PARAMS)


class BaselineConfig(Section):
    """One baseline: ``kind`` names the algorithm, ``params`` are that kind's (typed per kind)."""

    kind: str
    params: BaselineParams = Field(default_factory=dict, validate_default=True)  # type: ignore[arg-type]

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        if kind not in BASELINE_PARAMS:
            raise ValueError(
                f"unknown baseline kind {kind!r}; known kinds: {', '.join(BASELINE_KINDS)}"
            )
        return kind

    @field_validator("params", mode="wrap")  # wrap, not plain: dumps keep the union's serializer
    @classmethod
    def _typed_params(
        cls, params: Any, _: ValidatorFunctionWrapHandler, info: ValidationInfo
    ) -> Any:
        kind = info.data.get("kind")
        if kind is None:
            return params  # the kind's own error is reported; its params cannot be checked
        model = BASELINE_PARAMS[kind]
        return params if type(params) is model else model.model_validate(params)


def default_baselines() -> dict[str, BaselineConfig]:
    """Every baseline kind with its default parameters, named by its kind."""
    return {kind: BaselineConfig(kind=kind) for kind in BASELINE_KINDS}
