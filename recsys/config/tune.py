"""The ``tune:`` section: the study ``recsys tune`` runs and the space it searches.

The space maps dotted keys of the ``model`` and ``train`` sections (``train.learning_rate``) to a
range, a list of choices or a fixed value, so a new switch is searched by naming it in the YAML.
Every key, bound and choice is checked against the section's own field when the config loads
(``search_space``): a space that loads only ever yields trial configs that load.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    BeforeValidator,
    Field,
    ValidationError,
    model_serializer,
    model_validator,
)

from recsys.config.fields import Flag, Float, Int, MetricName, Section
from recsys.core.metrics import Metric, parse_metric

NOT_SEARCHED = {"train.epochs": "the epoch count is chosen per trial on valid (tune.max_epochs)"}
Option = str | int | float | bool | None  # what Optuna stores for a categorical choice


def _number(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {str(value).lower()}")
    return value


Number = Annotated[int | float, BeforeValidator(_number)]  # keeps 64 an int and 0.5 a float


class Param(Section):
    """One searched key: a range (``low``/``high``, with ``step`` or ``log``), ``choices``, or a
    fixed ``value`` for every trial; ``when`` searches it only where another key has a value."""

    low: Number | None = None
    high: Number | None = None
    step: Number | None = None
    log: Flag = False
    choices: list[Any] | None = None
    value: Any = None
    when: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _bare_value(cls, raw: Any) -> Any:
        if isinstance(raw, dict | Param):
            return raw
        if isinstance(raw, list):
            raise ValueError(
                "a bare list is ambiguous: write {choices: [...]} to search among its items "
                "or {value: [...]} to fix it"
            )
        return {"value": raw}  # `train.loss: bpr-max` fixes the key for every trial

    @model_validator(mode="after")
    def _one_form(self) -> Param:
        ranged = self.is_range
        forms = [
            name
            for name, given in (
                ("a range (low/high)", ranged),
                ("choices", self.choices is not None),
                ("a fixed value", self.is_fixed),
            )
            if given
        ]
        if len(forms) != 1:
            found = f" (got {' and '.join(forms)})" if forms else ""
            raise ValueError(f"give exactly one of low/high, choices or value{found}")
        if ranged:
            self._check_range()
        if self.choices is not None:
            if not self.choices:
                raise ValueError("choices is empty: give at least one")
            seen = [json.dumps(c, sort_keys=True) for c in self.choices]
            twice = [c for i, c in enumerate(self.choices) if seen[i] in seen[:i]]
            if twice:
                raise ValueError(f"choice {twice[0]!r} is listed twice")
        if self.is_fixed and self.when:
            raise ValueError("a fixed value applies to every trial; 'when' is for searched keys")
        return self

    def _check_range(self) -> None:
        low, high, step = self.low, self.high, self.step
        if low is None or high is None:
            raise ValueError("a range needs both low and high")
        if not all(math.isfinite(v) for v in (low, high, step or 1)):
            raise ValueError("low, high and step must be finite numbers")
        if low > high:
            raise ValueError(f"low {low} is above high {high}")
        if self.log and low <= 0:
            raise ValueError(f"a log range needs low > 0 (got low {low})")
        if self.log and step is not None:
            raise ValueError("step and log cannot be combined (a log range is continuous)")
        if step is not None:
            if step <= 0:
                raise ValueError(f"step must be above 0 (got {step})")
            n = (high - low) / step
            if abs(n - round(n)) > 1e-9 * max(1.0, n):
                raise ValueError(
                    f"step {step} does not fit the range: high - low = {high - low} is not a "
                    "whole number of steps"
                )

    @property
    def is_range(self) -> bool:
        return any(v is not None for v in (self.low, self.high, self.step)) or self.log

    @property
    def is_fixed(self) -> bool:
        return "value" in self.model_fields_set

    @model_serializer(mode="wrap")
    def _as_written(self, handler: Any) -> Any:
        """Only the keys the param was given, so a dumped space loads back as the same space."""
        dumped = handler(self)
        return {k: v for k, v in dumped.items() if k in self.model_fields_set}


def default_space() -> dict[str, Param]:
    """The published GRU4Rec search spaces (Hidasi & Czapp 2023): one layer, both losses."""
    bpr_max = {"train.loss": "bpr-max"}
    return {
        "model.layers": Param(low=64, high=512, step=32),  # one GRU layer of this size
        "train.batch_size": Param(low=32, high=256, step=16),
        "train.learning_rate": Param(low=0.01, high=0.25, log=True),
        "model.dropout_embed": Param(low=0.0, high=0.5),
        "model.dropout_hidden": Param(low=0.0, high=0.7),
        "train.momentum": Param(low=0.0, high=0.9),
        "train.sample_alpha": Param(low=0.0, high=1.0),
        "train.loss": Param(choices=["cross-entropy", "bpr-max"]),
        "train.bpreg": Param(low=0.0, high=2.0, when=bpr_max),
        "train.elu_param": Param(choices=[0.0, 0.5, 1.0], when=bpr_max),
    }


class PrunerConfig(Section):
    """Stop a trial whose valid metric after an epoch is below the median of earlier trials."""

    kind: Literal["median", "none"] = "median"
    startup_trials: Annotated[Int, Field(ge=0)] = 5  # trials finished before any is pruned
    # epochs before the pruner's first look: 0 judges a trial after epoch 1, 1 after epoch 2
    warmup_epochs: Annotated[Int, Field(ge=0)] = 1


class TuneConfig(Section):
    """The study: its size, what it maximises on valid, and the space (``recsys tune``)."""

    study: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")] | None = None
    # Finished trials (complete or pruned) the study should have; `--trials N` adds N instead.
    n_trials: Annotated[Int, Field(ge=1)] = 20
    timeout_seconds: Annotated[Float, Field(gt=0)] | None = None  # no new trial after this
    metric: MetricName = "mrr@20"  # on valid, at its own cut-off
    max_epochs: Annotated[Int, Field(ge=1)] = 10
    patience: Annotated[Int, Field(ge=1)] | None = 2  # stop a trial this many epochs past its best
    seed: Int = 0
    pruner: PrunerConfig = PrunerConfig()
    space: dict[str, Param] = Field(default_factory=default_space)

    @property
    def target(self) -> Metric:
        return parse_metric(self.metric)


@dataclass(frozen=True)
class SearchParam:
    """A space entry resolved against its field: what Optuna samples and what the config gets."""

    key: str  # "train.learning_rate"
    section: str  # "train"
    field: str  # "learning_rate"
    kind: Literal["int", "float", "choice", "fixed"]
    low: float = 0.0
    high: float = 0.0
    step: float | None = None
    log: bool = False
    options: tuple[Option, ...] = ()  # the choices as Optuna stores them (lists as JSON text)
    values: tuple[Any, ...] = ()  # the choices as the config takes them
    when: tuple[tuple[str, Option], ...] = ()  # (key, option): searched only where all hold
    as_list: bool = False  # the field is a list (model.layers): a number n becomes [n]

    def config_value(self, sampled: Any) -> Any:
        """The field's value for what Optuna sampled (``None`` for a fixed key)."""
        if self.kind == "choice":
            sampled = self.values[self.options.index(sampled)]
        elif self.kind == "fixed":
            sampled = self.values[0]
        return [sampled] if self.as_list and not isinstance(sampled, list) else sampled


def _option(choice: Any) -> Option:
    return choice if choice is None or isinstance(choice, str | int | float) else json.dumps(choice)


def _field_kind(annotation: Any) -> tuple[str, bool]:
    """(``int`` | ``float`` | ``other`` | ``section``, is a list) of a field's annotation."""
    as_list = get_origin(annotation) is list
    if as_list:
        annotation = get_args(annotation)[0]
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, type(int | None)):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if any(isinstance(a, type) and issubclass(a, BaseModel) for a in args):
            return "section", as_list
        return "other", as_list
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section", as_list
    if annotation is int:
        return "int", as_list
    return ("float" if annotation is float else "other"), as_list


def _check_value(key: str, section: Section, field: str, what: str, value: Any, as_list: bool):
    """Raise unless ``value`` is a valid value of the field, given the section's other values."""
    if as_list and not isinstance(value, list):
        value = [value]
    try:
        type(section).model_validate({**section.model_dump(), field: value})
    except ValidationError as err:
        msg = err.errors()[0]["msg"]
        raise ValueError(
            f"tune.space.{key}: {what} {value!r} is not a valid {key}: {msg}"
        ) from None


def _resolve(key: str, param: Param, sections: Mapping[str, Section]) -> SearchParam:
    section_name, _, field = key.partition(".")
    if section_name not in sections or not field:
        raise ValueError(
            f"tune.space.{key}: unknown parameter: a key is "
            + " or ".join(f"{name}.<field>" for name in sections)
        )
    section = sections[section_name]
    fields = type(section).model_fields
    if field not in fields:
        raise ValueError(
            f"tune.space.{key}: unknown parameter: {section_name} has no field {field!r} "
            f"(its fields: {', '.join(fields)})"
        )
    if key in NOT_SEARCHED:
        raise ValueError(f"tune.space.{key}: not searchable: {NOT_SEARCHED[key]}")
    kind, as_list = _field_kind(fields[field].annotation)
    if kind == "section":
        raise ValueError(f"tune.space.{key}: not searchable: it is a section, search its keys")
    base = {"key": key, "section": section_name, "field": field, "as_list": as_list}
    if param.is_fixed:
        _check_value(key, section, field, "value", param.value, as_list)
        return SearchParam(kind="fixed", values=(param.value,), **base)
    if param.choices is not None:
        for choice in param.choices:
            _check_value(key, section, field, "choice", choice, as_list)
        options = tuple(_option(c) for c in param.choices)
        return SearchParam(kind="choice", options=options, values=tuple(param.choices), **base)
    if kind not in ("int", "float"):
        raise ValueError(f"tune.space.{key}: a range needs a numeric field; use choices")
    bounds = {"low": param.low, "high": param.high, "step": param.step}
    if kind == "int":
        fractional = [f"{k} {v}" for k, v in bounds.items() if v is not None and type(v) is not int]
        if fractional:
            raise ValueError(f"tune.space.{key}: takes whole numbers (got {fractional[0]})")
    for bound in ("low", "high"):
        _check_value(key, section, field, bound, bounds[bound], as_list)
    return SearchParam(
        kind=kind,
        low=param.low,  # type: ignore[arg-type]
        high=param.high,  # type: ignore[arg-type]
        step=param.step,
        log=param.log,
        **base,
    )


def search_space(tune: TuneConfig, sections: Mapping[str, Section]) -> tuple[SearchParam, ...]:
    """The space resolved against the config's sections (``{"model": ..., "train": ...}``),
    unconditional keys first so a ``when`` always names a key sampled before it.

    A ValueError names the key (``tune.space.train.lr: unknown parameter ...``)."""
    resolved = {key: _resolve(key, param, sections) for key, param in tune.space.items()}
    for key, param in tune.space.items():
        when: list[tuple[str, Option]] = []
        for other, value in param.when.items():
            target = resolved.get(other)
            if target is None or target.kind != "choice" or target.when:
                raise ValueError(
                    f"tune.space.{key}.when: {other!r} is not a key searched among choices "
                    "(without a 'when' of its own) in tune.space"
                )
            if _option(value) not in target.options:
                raise ValueError(
                    f"tune.space.{key}.when: {value!r} is not one of the choices of {other} "
                    f"{list(target.values)}"
                )
            when.append((other, _option(value)))
        resolved[key] = SearchParam(**{**resolved[key].__dict__, "when": tuple(when)})
    ordered = sorted(resolved.values(), key=lambda p: bool(p.when))
    return tuple(ordered)
