"""`recsys prepare` as a user runs it: a subprocess, real files, a private MLflow store.

Every bad input ends with exit code 1 and one explanation on stderr that names the file, the
column or line, and what was expected; never a traceback, never a half-written output.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pipelines.prepare import prepare
from recsys.config import load_config
from recsys.core.errors import RecsysError
from recsys.data.preparation import load_prepared
from recsys.data.schema import SPLITS
from recsys.data.synthetic import SyntheticConfig, generate_clicks
from tests.conftest import ROOT, run_cli, write_config

OUR_CONFIGS = [
    "yoochoose-100k",
    "diginetica-sample",
    "retailrocket",
    "rees46",
    "coveo",
    "yoochoose",
]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One SQLite MLflow store for the module: creating one costs seconds, so share it."""
    folder = tmp_path_factory.mktemp("mlops")
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}


def gru4rec_tsv(path: Path, n_sessions: int = 300) -> Path:
    """A small real-looking GRU4Rec TSV (SessionId, ItemId, Time in epoch seconds)."""
    clicks = generate_clicks(
        SyntheticConfig(seed=1, n_items=60, n_sessions=n_sessions, n_intents=5, days=6)
    )
    lines = [f"{s}\t{i}\t{t.timestamp():.3f}" for s, i, t in clicks.iter_rows()]
    path.write_text("SessionId\tItemId\tTime\n" + "\n".join(lines) + "\n")
    return path


def config_for(tmp_path: Path, source: dict[str, Any], **preparation: Any) -> Path:
    raw = {
        "name": "cli",
        "workdir": str(tmp_path / "work"),
        "data": {"source": source, "preparation": {"min_item_support": 2, **preparation}},
    }
    return write_config(tmp_path / "config.yaml", raw)


def prepare_cli(
    config: Path, store: dict[str, str], *extra: str
) -> subprocess.CompletedProcess[str]:
    return run_cli("prepare", "--config", str(config), *extra, env=store)


def leftovers(workdir: Path) -> list[str]:
    """Temporary siblings of an atomic write that survived (there must be none)."""
    if not workdir.exists():
        return []
    return sorted(p.name for p in workdir.rglob(".*") if p.name.endswith((".tmp", ".old")))


def assert_user_error(result: subprocess.CompletedProcess[str], *phrases: str) -> None:
    """Exit code 1, no traceback, and an ``error:`` message holding every phrase."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "error: " in result.stderr, result.stderr
    message = result.stderr.split("error: ", 1)[1]
    for phrase in phrases:
        assert phrase in message, (phrase, message)


def test_prepare_then_up_to_date_then_a_failed_rerun_keeps_the_good_output(
    tmp_path: Path, store: dict[str, str]
) -> None:
    log = gru4rec_tsv(tmp_path / "clicks.tsv")
    config_path = config_for(tmp_path, {"format": "gru4rec_tsv", "path": str(log)})
    config = load_config(config_path)
    out = config.prepared_dir

    first = prepare_cli(config_path, store)
    assert first.returncode == 0, first.stderr
    assert "Traceback" not in first.stderr
    assert "prepared dataset" in first.stdout and "test predictions" in first.stdout
    good = {p.name: p.read_bytes() for p in out.iterdir()}
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert {f"{s}.parquet" for s in SPLITS} | {"items.parquet", "stats.json"} == set(good)

    again = prepare_cli(config_path, store)
    assert again.returncode == 0, again.stderr
    assert "up to date" in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes

    # Break the source: a bad item id on line 5. The forced rerun fails and says where.
    lines = log.read_text().splitlines()
    session, _, time = lines[3].split("\t")
    lines[4] = f"{session}\tnot-an-id\t{time}"
    log.write_text("\n".join(lines) + "\n")
    broken = prepare_cli(config_path, store, "--force")
    assert_user_error(broken, str(log), "'ItemId'", "integer item id", "'not-an-id'", "line 5")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == good
    assert load_prepared(out).train.height > 0
    assert leftovers(config.workdir) == []


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _bad_cases() -> list[Any]:
    """(case id, files to write, source config, preparation overrides, phrases in the error)."""
    header = "SessionId\tItemId\tTime\n"
    good_rows = "1\t10\t1396437466.94\n1\t11\t1396437470\n"
    return [
        pytest.param(
            {},
            {"path": "{tmp}/absent.tsv"},
            {},
            ["absent.tsv", "file not found"],
            id="missing-file",
        ),
        pytest.param(
            {"empty.tsv": ""},
            {"path": "{tmp}/empty.tsv"},
            {},
            ["empty.tsv", "file is empty"],
            id="empty-file",
        ),
        pytest.param(
            {"misnamed.tsv": "session\tItemId\tTime\n" + good_rows},
            {"path": "{tmp}/misnamed.tsv"},
            {},
            ["misnamed.tsv", "missing column(s) ['SessionId']", "'session'"],
            id="misnamed-column",
        ),
        pytest.param(
            {"when.tsv": header + good_rows + "1\t12\t2014-04-02 11:17\n"},
            {"path": "{tmp}/when.tsv"},
            {},
            ["when.tsv", "column 'Time'", "epoch seconds", "'2014-04-02 11:17'", "line 4"],
            id="unparsable-timestamp",
        ),
        pytest.param(
            {"ids.tsv": header + good_rows + "x1\t12\t1396437480\n"},
            {"path": "{tmp}/ids.tsv"},
            {},
            ["ids.tsv", "column 'SessionId'", "integer session id", "'x1'", "line 4"],
            id="unparsable-id",
        ),
        pytest.param(
            {"semi.tsv": header.replace("\t", ";") + good_rows.replace("\t", ";")},
            {"path": "{tmp}/semi.tsv"},
            {},
            ["semi.tsv", "tab-separated", "semicolon-separated", "wrong delimiter"],
            id="wrong-delimiter",
        ),
        pytest.param(
            {"sparse.tsv": header + good_rows + "2\t13\t1396437500\n"},
            {"path": "{tmp}/sparse.tsv"},
            {"min_item_support": 5},
            ["sparse.tsv", "every event was filtered away", "min_item_support=5"],
            id="everything-filtered",
        ),
    ]


@pytest.mark.parametrize(("files", "source", "preparation", "phrases"), _bad_cases())
def test_bad_input_is_one_clear_error(
    tmp_path: Path,
    store: dict[str, str],
    files: dict[str, str],
    source: dict[str, str],
    preparation: dict[str, Any],
    phrases: list[str],
) -> None:
    for name, text in files.items():
        _write(tmp_path, name, text)
    source = {"format": "gru4rec_tsv", "path": source["path"].format(tmp=tmp_path)}
    config_path = config_for(tmp_path, source, **preparation)
    result = prepare_cli(config_path, store)
    assert_user_error(result, *phrases)
    workdir = tmp_path / "work"
    assert not (workdir / "cli" / "prepared").exists()
    assert leftovers(workdir) == []


CONFIG_CASES = [
    pytest.param(
        "name: c\ndata:\n  source:\n    format: synthetic\n  preparaton:\n    test_days: 1\n",
        ["config.yaml", "data.preparaton", "unknown key"],
        id="unknown-key",
    ),
    pytest.param(
        "name: c\ndata:\n  source:\n    format: synthetic\n  preparation:\n    min_item_support: five\n",
        ["config.yaml", "data.preparation.min_item_support", "integer", "'five'"],
        id="wrong-type",
    ),
    pytest.param(
        "name: c\ndata:\n  source:\n    format: gru4rec_tsv\n",
        ["config.yaml", "data.source", "needs a 'path'"],
        id="missing-path",
    ),
    pytest.param(
        "name: c\ndata:\n  source:\n    format: csv\n    path: x.csv\n",
        ["config.yaml", "data.source.format", "'csv'"],
        id="unknown-format",
    ),
    pytest.param("name: [c\n", ["config.yaml", "not valid YAML"], id="bad-yaml"),
]


@pytest.mark.parametrize(("text", "phrases"), CONFIG_CASES)
def test_bad_config_is_one_clear_error(
    tmp_path: Path, store: dict[str, str], text: str, phrases: list[str]
) -> None:
    path = _write(tmp_path, "config.yaml", text)
    assert_user_error(prepare_cli(path, store), *phrases)


def test_missing_config_file(tmp_path: Path, store: dict[str, str]) -> None:
    result = prepare_cli(tmp_path / "nope.yaml", store)
    assert_user_error(result, "nope.yaml", "config file not found")


@pytest.mark.parametrize("name", OUR_CONFIGS)
def test_shipped_configs_are_valid(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    config = load_config(f"configs/{name}.yaml", {"workdir": str(tmp_path)})
    assert config.name == name
    paths = [str(p) for p in config.data.source.paths]
    assert all(p.startswith(("raw/", "../shared/data/")) for p in paths), paths
    if paths[0].startswith("raw/") and not Path(paths[0]).exists():
        # Not downloaded: preparing says which file is missing and where it was looked for.
        where = f"(relative paths are read from {ROOT})"
        with pytest.raises(
            RecsysError, match=f"^{re.escape(paths[0])}: file not found {re.escape(where)}$"
        ):
            prepare(config)
