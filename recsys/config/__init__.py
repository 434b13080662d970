"""Run configuration: one YAML file, validated into typed dataclass-like models.

One model per concern (source, preparation, model, training, evaluation, registry). Unknown keys,
wrong types (``epochs: true`` included), unknown metrics and bad baseline parameters are errors
that name the file and the key when the config is loaded, never later in a run. ``fields`` holds
the strict field types every section uses, ``baselines`` the baseline kinds and their parameters.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from recsys.config.baselines import (
    BASELINE_KINDS,
    BASELINE_PARAMS,
    BaselineConfig,
    BaselineParams,
    ItemKNNParams,
    NoParams,
    SequentialRulesParams,
    STANParams,
    VSKNNParams,
    default_baselines,
)
from recsys.config.fields import FiniteFloat, Flag, Float, Int, MetricName, Section
from recsys.config.fusion import FusionConfig
from recsys.config.synthetic import SyntheticConfig
from recsys.config.tracking import TrackingConfig
from recsys.config.tune import TuneConfig, search_space
from recsys.core.errors import RecsysError
from recsys.core.metrics import parse_metric

__all__ = [
    "BASELINE_KINDS",
    "BASELINE_PARAMS",
    "SOURCE_FORMATS",
    "BaselineConfig",
    "BaselineParams",
    "Config",
    "DataConfig",
    "EarlyStoppingConfig",
    "EvaluationConfig",
    "FusionConfig",
    "ItemKNNParams",
    "ModelConfig",
    "NoParams",
    "PreparationConfig",
    "RegistryConfig",
    "STANParams",
    "SequentialRulesParams",
    "SourceConfig",
    "SourceFormat",
    "TrackingConfig",
    "TrainConfig",
    "TuneConfig",
    "VSKNNParams",
    "baseline_config",
    "config_from_dict",
    "default_baselines",
    "load_config",
]

SourceFormat = Literal[
    "synthetic",
    "yoochoose",
    "gru4rec_tsv",
    "diginetica",
    "retailrocket",
    "rees46",
    "coveo",
    "srgnn_tsv",
    "table",
]
SOURCE_FORMATS: tuple[str, ...] = get_args(SourceFormat)  # the one list; data's readers follow it


MODEL_FILE = "model.pt"  # the trained model's file name, in a model directory or an MLflow model


class SourceConfig(Section):
    """Where the raw click log is and how to read it."""

    format: SourceFormat
    path: Path | list[Path] | None = None
    # `table` format: canonical column -> column name in the file.
    columns: dict[Literal["session_id", "item_id", "timestamp"], str] | None = None
    # `table` format: unit of a numeric timestamp column, or "datetime" for parsed strings.
    timestamp_unit: Literal["s", "ms", "us", "ns", "datetime"] = "s"
    separator: str | None = None
    # Formats without sessions (RetailRocket, Rees46) or with long ones (Coveo) are cut here.
    session_gap_minutes: Annotated[FiniteFloat, Field(gt=0)] = 60.0
    synthetic: SyntheticConfig | None = None

    @model_validator(mode="after")
    def _check_source(self) -> SourceConfig:
        if self.format == "synthetic":
            if self.synthetic is None:
                object.__setattr__(self, "synthetic", SyntheticConfig())
        elif self.path is None:
            raise ValueError(f"format '{self.format}' needs a 'path' to the raw log")
        if self.format == "table" and not self.columns:
            raise ValueError(
                "format 'table' needs 'columns' mapping session_id, item_id, timestamp to file columns"
            )
        return self

    @property
    def paths(self) -> list[Path]:
        if self.path is None:
            return []
        return list(self.path) if isinstance(self.path, list) else [self.path]


class PreparationConfig(Section):
    """The preparation protocol (DESIGN §2); defaults are the published GRU4Rec protocol."""

    dedup_consecutive: Flag = True
    min_session_length: Annotated[Int, Field(ge=1)] = 2
    min_item_support: Annotated[Int, Field(ge=1)] = 5
    # Repeat the two filters until nothing changes (the 2023 reference); False = one pass.
    iterate_filters: Flag = True
    # "time": split at t_max - test_days (or at split_time); "given": keep the reader's split column.
    split: Literal["time", "given"] = "time"
    test_days: Annotated[FiniteFloat, Field(gt=0)] = 1.0
    split_time: str | None = None
    # For "given" splits without timestamps: share of the last train sessions used as `valid`.
    valid_fraction: Annotated[Float, Field(gt=0, lt=1)] = 0.08
    # streaming: in bounded memory (data/streaming.py), same files; auto: for raw files >= 256 MiB
    engine: Literal["auto", "memory", "streaming"] = "auto"


class DataConfig(Section):
    source: SourceConfig
    preparation: PreparationConfig = PreparationConfig()


class ModelConfig(Section):
    """GRU4Rec network shape (DESIGN §3)."""

    layers: list[Annotated[Int, Field(ge=1)]] = [100]
    cell: Literal["gru", "lstm", "rnn", "ffn"] = "gru"  # model/cells.py; ffn: no memory at all
    # shared: input vectors = output vectors; separate: own input embedding; none: one-hot input.
    embedding: Literal["shared", "separate", "none"] = "shared"
    embedding_dim: Annotated[Int, Field(ge=0)] = 0  # separate mode; 0 = size of the first layer
    dropout_embed: Annotated[Float, Field(ge=0, lt=1)] = 0.0
    dropout_hidden: Annotated[Float, Field(ge=0, lt=1)] = 0.0
    # gru4rec: the published model; repeat: + a learned bonus for the session's own last
    # `repeat_window` items (model/readout.py), learned on the `repeat_holdout` share of the
    # training sessions alone, which the network does not fit
    readout: Literal["gru4rec", "repeat"] = "gru4rec"
    repeat_window: Annotated[Int, Field(ge=1, le=200)] = 10
    repeat_holdout: Annotated[Float, Field(ge=0, le=0.5)] = 0.1

    @field_validator("layers")
    @classmethod
    def _non_empty(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("needs at least one GRU layer")
        return v


class EarlyStoppingConfig(Section):
    """Tune the epoch count on train_tr/valid, then refit on the full train split."""

    patience: Annotated[Int, Field(ge=1)] = 2
    # Any cut-off: the tuning evaluates at this metric's own cut-off, not evaluation.cutoffs.
    metric: MetricName = "mrr@20"


class TrainConfig(Section):
    loss: Literal["cross-entropy", "bpr-max", "top1-max"] = "cross-entropy"
    batch_size: Annotated[Int, Field(ge=1)] = 32
    epochs: Annotated[Int, Field(ge=1)] = 5
    learning_rate: Annotated[FiniteFloat, Field(gt=0)] = 0.05
    momentum: Annotated[Float, Field(ge=0, lt=1)] = 0.0
    n_sample: Annotated[Int, Field(ge=0)] = 2048
    sample_alpha: Annotated[Float, Field(ge=0, le=1)] = 0.5
    sample_store_size: Annotated[Int, Field(ge=0)] = 10_000_000
    logq: Annotated[Float, Field(ge=0, le=1)] = 0.0
    bpreg: Annotated[FiniteFloat, Field(ge=0)] = 1.0
    elu_param: Annotated[FiniteFloat, Field(ge=0)] = 0.5
    seed: Int = 42
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    # bf16: the step's matrix products take bfloat16 operands (recsys/model/matmul.py), ~2.4x
    # faster on CPUs with AVX512-BF16 or AMX; everything else stays fp32. auto: bf16 on such
    # CPUs, fp32 on other CPUs and on GPUs (where a step is bound by kernel launches)
    matmul: Literal["fp32", "bf16", "auto"] = "fp32"
    # optimiser updates, BPR-max, GRU cell, dropout masks: native = fused C++ kernels
    # (recsys/model/kernels.py, CPU, built once with the local compiler), torch = torch ops (same
    # arithmetic; dropout from another random stream); auto = native where it builds
    kernels: Literal["auto", "native", "torch"] = "auto"
    # intra-op threads; 0 = the usable cores less one (recsys/training/threads.py: torch's one
    # per core lost ~90% of its speed beside one other busy process on 2 cores)
    threads: Annotated[Int, Field(ge=0)] = 0
    nproc: Annotated[Int, Field(ge=1)] = 1  # data-parallel processes: docs/distributed.md
    max_steps: Annotated[Int, Field(ge=0)] = (
        0  # 0 = full epochs; >0 caps steps per epoch (smoke runs)
    )
    # truncated BPTT (recsys/training/bptt.py): each step's loss reaches back through the
    # last k steps of its slot's session; 1 = GRU4Rec (gradients stop after one step)
    bptt: Annotated[Int, Field(ge=1, le=100)] = 1
    early_stopping: EarlyStoppingConfig | None = None
    warm_start: str | None = None  # a base model and its window: docs/retraining.md
    window_days: Annotated[Float, Field(gt=0)] | None = None


class EvaluationConfig(Section):
    cutoffs: Annotated[list[Annotated[Int, Field(ge=1)]], Field(min_length=1)] = [1, 5, 10, 20]
    ties: Literal["conservative", "standard", "median"] = "conservative"
    batch_size: Annotated[Int, Field(ge=1)] = 512
    exclude_seen: Flag = False
    coverage_k: Annotated[Int, Field(ge=1)] = 20
    baselines: dict[str, BaselineConfig] = Field(default_factory=default_baselines)
    fusion: FusionConfig = FusionConfig()

    @model_validator(mode="after")
    def _hybrid_has_its_baseline(self) -> EvaluationConfig:
        wanted = self.fusion.hybrid_baseline
        if wanted is not None and wanted not in self.baselines:
            raise ValueError(
                f"fusion.hybrid_baseline {wanted!r} is not among evaluation.baselines "
                f"({', '.join(self.baselines) or 'none configured'})"
            )
        if wanted is not None and not (
            self.fusion.hybrid_weights and self.fusion.hybrid_temperatures
        ):
            raise ValueError(
                "fusion.hybrid_weights and hybrid_temperatures need one value each at least"
            )
        return self


class RegistryConfig(Section):
    # The gate: a new version becomes champion if it beats the champion on this test metric.
    metric: MetricName = "mrr@20"
    # default gru4rec-<name>; a name that fits in a models:/<name>@<alias> URI
    model_name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")] | None = None


class Config(Section):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    workdir: Path = Path("data")
    data: DataConfig
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    registry: RegistryConfig = RegistryConfig()
    tune: TuneConfig = TuneConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _tune_space_fits(self) -> Config:
        search_space(self.tune, {"model": self.model, "train": self.train})  # names a bad key
        return self

    @model_validator(mode="after")
    def _gate_is_evaluated(self) -> Config:
        metric = self.registry.metric
        k = parse_metric(metric).k
        if k not in self.evaluation.cutoffs:
            raise ValueError(
                f"registry.metric: {metric!r} is never computed, its cut-off {k} is not among "
                f"evaluation.cutoffs {list(self.evaluation.cutoffs)}"
            )
        return self

    @model_validator(mode="after")
    def _one_session_bonus(self) -> Config:
        if self.evaluation.fusion.bonus_weights and self.model.readout == "repeat":
            raise ValueError(
                "evaluation.fusion.bonus_weights: the fixed session bonus is a fusion of the "
                "plain model; with model.readout: repeat the network learns its own bonus"
            )
        return self

    # Path conventions, defined once.
    @property
    def run_dir(self) -> Path:
        return self.workdir / self.name

    @property
    def prepared_dir(self) -> Path:
        return self.run_dir / "prepared"

    @property
    def model_dir(self) -> Path:
        return self.run_dir / "model"

    @property
    def model_file(self) -> Path:
        """The trained-model artifact (``recsys.model.artifact.TrainedModel``)."""
        return self.model_dir / MODEL_FILE

    @property
    def valid_model_file(self) -> Path:
        """GRU4Rec trained on train_tr, for choices made on valid (the fusion weights)."""
        return self.model_dir / "model-train_tr.pt"

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def evaluation_dir(self) -> Path:
        return self.run_dir / "evaluation"

    @property
    def registered_model_name(self) -> str:
        return self.registry.model_name or f"gru4rec-{self.name}"

    def flat_params(self) -> dict[str, str]:
        """The whole resolved config as flat ``a.b.c -> value`` strings (for MLflow params)."""
        out: dict[str, str] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            else:
                out[prefix] = json.dumps(value) if isinstance(value, list) else str(value)

        walk("", self.model_dump(mode="json"))
        return out


def _format_validation_error(source: Path | str, err: ValidationError) -> str:
    """One line per problem, each naming its dotted key, under a header naming the source."""
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-after"))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see configs/default.yaml for the known keys)"
        elif e["type"] == "value_error":
            msg = str(e["ctx"]["error"])  # our own checks: the message says what was found
        elif "input" in e and e["type"] not in ("missing",):
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"  - {loc}: {msg}" if loc else f"  - {msg}")
    return "\n".join(lines)


def load_config(path: Path | str, overrides: dict[str, Any] | None = None) -> Config:
    """Read and validate a YAML config; relative data paths resolve against the working directory."""
    path = Path(path)
    if not path.is_file():
        raise RecsysError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise RecsysError(
            f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
            f"save the config as UTF-8"
        ) from None
    except yaml.YAMLError as exc:
        raise RecsysError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise RecsysError(f"{path}: expected a mapping of config sections at the top level")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        _override(node, leaf, value)
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise RecsysError(_format_validation_error(path, err)) from None


def _override(node: dict[str, Any], key: str, value: Any) -> None:
    """Set ``node[key]``; a mapping merges key by key (replacing ``train`` for a seed would
    silently reset its other keys)."""
    if not (isinstance(value, dict) and isinstance(node.get(key), dict)):
        node[key] = value
        return
    for k, v in value.items():
        _override(node[key], k, v)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Validate a config given as a dict (tests, programmatic use)."""
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise RecsysError(_format_validation_error(Path("<dict>"), err)) from None


def baseline_config(kind: str, params: BaselineParams | Mapping[str, Any] | None) -> BaselineConfig:
    """A baseline given in code, checked as a config's ``evaluation.baselines`` entry is."""
    raw = {} if params is None else params if isinstance(params, Section) else dict(params)
    try:
        return BaselineConfig.model_validate({"kind": kind, "params": raw})
    except ValidationError as err:
        raise RecsysError(_format_validation_error(f"baseline {kind!r}", err)) from None
