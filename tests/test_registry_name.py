"""A custom registered-model name (``registry.model_name``) is the one every consumer resolves.

``recsys register`` registers under ``config.registered_model_name``; ``recsys recommend -c``,
``make recommend`` and ``recsys serve -c`` must find that champion, not a ``gru4rec-<name>``
that does not exist.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from pipelines.cli import main
from pipelines.serve import champion_uri, free_port, start_server, stop_server, wait_ready
from recsys.config import config_from_dict, load_config
from recsys.data.schema import ITEM, SESSION
from tests.conftest import QUIET, ROOT, run_cli, tiny_config, write_config

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # SQLAlchemy, in MLflow

REGISTERED = "shop-gru"
CHAMPION = f"models:/{REGISTERED}@champion"


def test_the_champion_uri_is_the_configured_registry_name(tmp_path: Path) -> None:
    raw = tiny_config(tmp_path, name="shop")
    assert champion_uri(config_from_dict(raw)) == "models:/gru4rec-shop@champion"
    raw["registry"] = {"model_name": REGISTERED}
    assert champion_uri(config_from_dict(raw)) == CHAMPION


def ranked_items(table: str) -> list[str]:
    """The item ids of ``recsys recommend``'s table, best first (header and rule skipped)."""
    rows = [line.split() for line in table.strip().splitlines()[2:]]
    assert [int(r[0]) for r in rows] == list(range(1, len(rows) + 1))
    return [r[1] for r in rows]


def test_a_custom_registry_name_is_served_and_recommended(
    tmp_path: Path, mlflow_store: str
) -> None:
    raw = tiny_config(tmp_path / "work", name="shop", registry={"model_name": REGISTERED})
    config_path = write_config(tmp_path / "shop.yaml", raw)
    proc = run_cli("pipeline", "-c", str(config_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"load it with: {CHAMPION}" in proc.stdout
    registry = MlflowClient(tracking_uri=mlflow_store, registry_uri=mlflow_store)
    assert [m.name for m in registry.search_registered_models()] == [REGISTERED]

    config = load_config(config_path)
    test = pl.read_parquet(config.prepared_dir / "test.parquet")
    session = test.group_by(SESSION, maintain_order=True).agg(pl.col(ITEM))[ITEM][0].to_list()
    items = ",".join(map(str, session))

    # recsys recommend -c: the config's champion (the REST server below must agree with it)
    proc = run_cli("recommend", "-c", str(config_path), "--items", items, "-k", "5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = ranked_items(proc.stdout)
    assert len(expected) == 5

    # make recommend runs the same command (the venv is not reinstalled: -o its stamp)
    venv = Path(sys.executable).parent.parent
    make = subprocess.run(
        ["make", "-s", "-o", f"{venv}/.installed", "recommend", f"VENV={venv}"]
        + [f"CONFIG={config_path}", f"ITEMS={items}", "K=5"],
        cwd=ROOT,
        env={**os.environ, **QUIET},
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert make.returncode == 0, make.stderr[-3000:]
    assert ranked_items(make.stdout) == expected

    # recsys serve -c: the REST server loads that champion and answers with the same ranking
    port = free_port()
    log = tmp_path / "server.log"
    command = [sys.executable, "-m", "pipelines.cli", "serve", "-c", str(config_path)]
    server = start_server([*command, "--port", str(port)], {**os.environ, **QUIET}, log, ROOT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, server, log)
        body = {"dataframe_records": [{"items": session}], "params": {"k": 5}}
        request = urllib.request.Request(
            f"{url}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.loads(response.read())["predictions"][0]
        assert [str(i) for i in answer["items"]] == expected
    finally:
        stop_server(server)
    assert f"serving {CHAMPION}" in log.read_text()


def test_recommend_needs_exactly_one_of_model_and_config(tmp_path: Path) -> None:
    cli = CliRunner()
    neither = cli.invoke(main, ["recommend", "--items", "a,b"])
    both = cli.invoke(main, ["recommend", "-m", "models:/x@c", "-c", "c.yaml", "--items", "a"])
    for result in (neither, both):
        assert result.exit_code == 2
        assert "exactly one of --model/-m and --config/-c" in result.stderr
        assert result.exception is None or isinstance(result.exception, SystemExit)
    missing = tmp_path / "nope.yaml"
    for args in (["recommend", "--items", "a"], ["serve"]):
        result = cli.invoke(main, [*args, "-c", str(missing)])
        assert result.exit_code == 1
        assert result.stderr.strip() == f"error: {missing}: config file not found"
