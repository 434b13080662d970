"""A config that loads is a config that runs: every bad value is an error naming its key at load."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest

from pipelines.cache import config_key
from recsys.config import (
    SOURCE_FORMATS,
    Config,
    STANParams,
    VSKNNParams,
    config_from_dict,
    load_config,
)
from recsys.core.errors import RecsysError
from recsys.core.metrics import METRICS, Metric, metric_name, parse_metric
from recsys.data.sources import READERS
from tests.conftest import run_cli, tiny_config, write_config


def load(tmp_path: Path, **sections: Any) -> Config:
    """A tiny config with some sections replaced, written to YAML and loaded as a user's would be."""
    return load_config(write_config(tmp_path / "c.yaml", tiny_config(tmp_path, **sections)))


def rejected(tmp_path: Path, **sections: Any) -> str:
    with pytest.raises(RecsysError) as err:
        load(tmp_path, **sections)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'c.yaml'}: invalid configuration")
    return message


# --------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("metric", ["mrr", "recall@0", "foo@20", "mrr@", "MRR@20", "mrr@020", ""])
def test_an_unknown_early_stopping_metric_is_rejected_at_load(tmp_path: Path, metric: str) -> None:
    message = rejected(tmp_path, train={"early_stopping": {"metric": metric}})
    assert f"  - train.early_stopping.metric: {metric!r} is not a metric" in message
    assert "recall, mrr, ndcg" in message


@pytest.mark.parametrize("metric", ["mrr", "recall@0", "foo@20", "coverage@20"])
def test_an_unknown_registry_metric_is_rejected_at_load(tmp_path: Path, metric: str) -> None:
    message = rejected(tmp_path, registry={"metric": metric})
    assert f"  - registry.metric: {metric!r} is not a metric" in message


def test_early_stopping_takes_any_cut_off_and_the_registry_only_an_evaluated_one(
    tmp_path: Path,
) -> None:
    config = load(tmp_path, train={"early_stopping": {"metric": "ndcg@50"}})
    assert config.train.early_stopping is not None
    assert config.train.early_stopping.metric == "ndcg@50"  # tuned at its own cut-off
    assert load(tmp_path, registry={"metric": "recall@5"}).registry.metric == "recall@5"
    message = rejected(tmp_path, registry={"metric": "mrr@50"})
    assert "registry.metric: 'mrr@50' is never computed" in message
    assert "evaluation.cutoffs [1, 5, 10, 20]" in message
    # the default gate (mrr@20) needs 20 among the cutoffs too
    message = rejected(tmp_path, evaluation={"cutoffs": [5, 10]})
    assert "registry.metric: 'mrr@20' is never computed" in message


def test_a_bad_metric_stops_the_cli_before_any_work(tmp_path: Path) -> None:
    raw = tiny_config(tmp_path / "work", train={"early_stopping": {"metric": "mrr"}})
    config = write_config(tmp_path / "c.yaml", raw)
    proc = run_cli("train", "-c", str(config))
    assert proc.returncode == 1
    assert "train.early_stopping.metric: 'mrr' is not a metric" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "work").exists()  # nothing was prepared or trained


def test_metric_names_have_one_spelling() -> None:
    assert parse_metric("mrr@20") == Metric("mrr", 20)
    for name in METRICS:
        for k in (1, 7, 20, 1000):
            assert str(parse_metric(metric_name(name, k))) == metric_name(name, k)
    for text in ("mrr", "mrr@0", "mrr@-1", "mrr@1.5", "mrr @20", "recall@20 ", "hit@20"):
        with pytest.raises(ValueError, match="is not a metric"):
            parse_metric(text)


# --------------------------------------------------------------------------- baselines


def test_baselines_keep_their_yaml_shape_and_get_typed_parameters(tmp_path: Path) -> None:
    baselines = {
        "stan": {"kind": "stan", "params": {"k": 50, "lambda_snh": None}},
        "vsknn-same": {"kind": "vsknn", "params": {"weighting": "same"}},
        "pop": {"kind": "pop"},
    }
    config = load(tmp_path, evaluation={"baselines": baselines})
    specs = config.evaluation.baselines
    assert list(specs) == ["stan", "vsknn-same", "pop"]
    assert specs["stan"].params == STANParams(k=50, lambda_snh=None)
    assert specs["vsknn-same"].params == VSKNNParams(weighting="same")
    assert specs["pop"].params.model_dump() == {}


@pytest.mark.parametrize(
    ("params", "phrase"),
    [
        ({"k": 0}, "params.k: Input should be greater than or equal to 1 (got 0)"),
        ({"k": "many"}, "params.k: Input should be a valid integer (got 'many')"),
        ({"k": 5.0}, "params.k: Input should be a valid integer (got 5.0)"),
        ({"lambda_spw": 0}, "params.lambda_spw: Input should be greater than 0"),
        ({"lambda": 1.0}, "params: unknown parameter(s) ['lambda']; accepted parameters: k,"),
    ],
)
def test_a_bad_baseline_parameter_is_rejected_at_load_naming_the_key(
    tmp_path: Path, params: dict[str, Any], phrase: str
) -> None:
    baselines = {"stan": {"kind": "stan", "params": params}}
    message = rejected(tmp_path, evaluation={"baselines": baselines})
    assert f"  - evaluation.baselines.stan.{phrase}" in message


def test_an_unknown_baseline_kind_is_rejected_naming_the_known_ones(tmp_path: Path) -> None:
    message = rejected(tmp_path, evaluation={"baselines": {"knn": {"kind": "knn"}}})
    assert "evaluation.baselines.knn.kind: unknown baseline kind 'knn'" in message
    assert "pop, spop, iknn, sr, vsknn, stan" in message
    assert len(message.splitlines()) == 2  # the params of an unknown kind add no noise
    message = rejected(tmp_path, evaluation={"baselines": {"x": {"params": {}}}})
    assert "evaluation.baselines.x.kind: Field required" in message


# --------------------------------------------------------------------------- loose coercions


@pytest.mark.parametrize(
    ("sections", "phrase"),
    [
        ({"train": {"epochs": True}}, "train.epochs: Input should be a valid integer (got True)"),
        ({"train": {"epochs": 2.0}}, "train.epochs: Input should be a valid integer (got 2.0)"),
        ({"train": {"seed": "42"}}, "train.seed: Input should be a valid integer (got '42')"),
        ({"model": {"layers": [True]}}, "model.layers.0: Input should be a valid integer"),
        ({"evaluation": {"cutoffs": [1.0, 20]}}, "evaluation.cutoffs.0: Input should be a valid"),
        ({"train": {"learning_rate": True}}, "train.learning_rate: expected a number, got true"),
        ({"evaluation": {"exclude_seen": 1}}, "evaluation.exclude_seen: Input should be a valid"),
        ({"evaluation": {"exclude_seen": "no"}}, "evaluation.exclude_seen: Input should be a val"),
        ({"registry": {"model_name": ""}}, "registry.model_name: String should match pattern"),
    ],
)
def test_loose_values_are_not_coerced(
    tmp_path: Path, sections: dict[str, Any], phrase: str
) -> None:
    assert f"  - {phrase}" in rejected(tmp_path, **sections)


def test_numbers_as_people_write_them_in_yaml_still_load(tmp_path: Path) -> None:
    """An int where a float is expected, and ``1e-3``, which YAML 1.1 reads as text."""
    config = load(
        tmp_path,
        train={"learning_rate": "1e-3", "momentum": 0, "epochs": 3},
        evaluation={"exclude_seen": True},
    )
    assert config.train.learning_rate == 0.001 and config.train.momentum == 0.0
    assert config.train.epochs == 3 and config.evaluation.exclude_seen is True


def test_the_default_config_is_unchanged_by_the_stricter_types() -> None:
    config = config_from_dict({"name": "d", "data": {"source": {"format": "synthetic"}}})
    assert config.train.epochs == 5 and config.registry.metric == "mrr@20"
    assert list(config.evaluation.baselines) == ["pop", "spop", "iknn", "sr", "vsknn", "stan"]


# --------------------------------------------------------------------------- source formats


def test_every_source_format_of_the_config_has_a_reader_and_no_other() -> None:
    assert set(READERS) == set(SOURCE_FORMATS)


def test_typed_baseline_parameters_are_dumped_whole_and_quietly(tmp_path: Path) -> None:
    """MLflow params and the step cache keys read the dumped config: every parameter is there."""
    config = load(tmp_path, evaluation={"baselines": {"stan": {"kind": "stan"}}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pydantic warns when a union member dumps badly
        params = config.flat_params()
        config_key(config, "evaluation")
    assert params["evaluation.baselines.stan.kind"] == "stan"
    assert params["evaluation.baselines.stan.params.k"] == "500"
    assert params["evaluation.baselines.stan.params.lambda_snh"] == "5.0"


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("registry", "model_name", "shop/gru@x"),  # would break models:/<name>@<alias>
        ("train", "learning_rate", float("inf")),
        ("train", "bpreg", float("nan")),
        ("data.preparation", "test_days", float("inf")),
    ],
)
def test_values_that_would_break_a_run_later_are_rejected_at_load(
    tmp_path: Path, section: str, key: str, value: Any
) -> None:
    raw = tiny_config(tmp_path)
    node = raw
    for part in section.split("."):
        node = node.setdefault(part, {})
    node[key] = value
    with pytest.raises(RecsysError, match=rf"{section}\.{key}"):
        load_config(write_config(tmp_path / "c.yaml", raw))


def test_a_section_override_changes_its_keys_and_keeps_the_rest_of_the_section() -> None:
    """``{"train": {"seed": 1}}`` once replaced the whole section: a probe meant to rerun the
    Diginetica setting with another seed trained cross-entropy at batch 32 without a word."""
    shipped = load_config("configs/diginetica.yaml")
    nested = load_config("configs/diginetica.yaml", {"train": {"seed": 1, "threads": 1}})
    dotted = load_config("configs/diginetica.yaml", {"train.seed": 1, "train.threads": 1})
    assert (nested.train.seed, nested.train.threads) == (1, 1)
    assert nested.train.loss == shipped.train.loss == "bpr-max"
    assert nested.train.batch_size == shipped.train.batch_size == 128
    assert nested.model_dump() == dotted.model_dump()
    assert nested.model_dump(exclude={"train"}) == shipped.model_dump(exclude={"train"})


def test_an_override_that_is_no_mapping_replaces_the_value_whole() -> None:
    config = load_config("configs/diginetica.yaml", {"evaluation.cutoffs": [10, 20]})
    assert config.evaluation.cutoffs == [10, 20]  # not merged into [1, 5, 10, 20]
