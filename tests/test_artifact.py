"""The trained-model artifact: one file, read back exactly, every defect one clear error."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch

from recsys.config import ModelConfig
from recsys.core.errors import RecsysError
from recsys.model.artifact import ItemIndex, TrainedModel, file_fingerprint, find_model_file
from recsys.model.gru4rec import GRU4Rec


def _trained(ids: list[Any], support: list[float] | None = None) -> TrainedModel:
    network = GRU4Rec(len(ids), ModelConfig(layers=[8], embedding="separate"), seed=5)
    return TrainedModel(network, ItemIndex.of(ids, support), "shop", "f00d")


def test_save_then_load_gives_back_weights_index_and_origin(tmp_path: Path) -> None:
    original = _trained(list(range(100, 130)), [float(i) for i in range(30)])
    path = tmp_path / "model.pt"
    fingerprint = original.save(path)
    assert fingerprint == file_fingerprint(path) and len(fingerprint) == 16
    payload = torch.load(path, weights_only=True)  # nothing but tensors and plain values
    assert payload["item_ids"].dtype == torch.int64 and payload["id_kind"] == "int"
    assert payload["item_ids"][:2].tolist() == [100, 101]  # one tensor: it unpickles fast
    loaded = TrainedModel.load(path)
    original_state = original.network.state_dict()
    for name, tensor in loaded.network.state_dict().items():
        assert torch.equal(tensor, original_state[name]), name
    assert loaded.items == original.items
    assert (loaded.dataset, loaded.data_fingerprint) == ("shop", "f00d")
    assert loaded.network.config == original.network.config
    assert not loaded.network.training  # ready to score


def test_a_version_1_file_with_listed_ids_loads_the_same_model(tmp_path: Path) -> None:
    original = _trained(list(range(100, 130)), [float(i) for i in range(30)])
    original.save(tmp_path / "v2.pt")
    payload = torch.load(tmp_path / "v2.pt", weights_only=True)
    payload.update(version=1, item_ids=payload["item_ids"].tolist())
    payload["support"] = payload["support"].tolist()
    torch.save(payload, tmp_path / "v1.pt")
    loaded = TrainedModel.load(tmp_path / "v1.pt")
    assert loaded.items == original.items
    for name, tensor in loaded.network.state_dict().items():
        assert torch.equal(tensor, original.network.state_dict()[name]), name


def test_text_ids_are_stored_as_a_list_and_come_back_as_text(tmp_path: Path) -> None:
    original = _trained([f"sku-{i}" for i in range(12)])
    original.save(tmp_path / "model.pt")
    assert torch.load(tmp_path / "model.pt", weights_only=True)["item_ids"][0] == "sku-0"
    assert TrainedModel.load(tmp_path / "model.pt").items == original.items


def test_the_id_kind_is_decided_once_from_the_ids() -> None:
    assert ItemIndex.of([np.int64(7), 8]).id_kind == "int"
    assert ItemIndex.of([np.int64(7), 8]).ids == (7, 8)  # numpy scalars become plain ints
    assert ItemIndex.of(["a", "b"]).id_kind == "str"
    assert ItemIndex.of([1, "b"]).id_kind == "str"
    assert ItemIndex.of([True, 2]).id_kind == "str"  # a bool is no item number
    table = pl.DataFrame({"item_id": ["x", "y"], "item_idx": [1, 0], "support": [3, 9]})
    index = ItemIndex.from_table(table)
    assert index.ids == ("y", "x") and index.support == (9.0, 3.0)  # in item_idx order


def test_an_index_that_does_not_match_the_network_is_refused() -> None:
    network = GRU4Rec(5, ModelConfig(layers=[4]))
    with pytest.raises(RecsysError, match="4 ids but the model scores 5 items"):
        TrainedModel(network, ItemIndex.of([1, 2, 3, 4]))
    with pytest.raises(RecsysError, match="3 ids but 2 supports"):
        ItemIndex.of([1, 2, 3], [1.0, 2.0])


def test_loading_a_foreign_or_garbage_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.ones(2)}, path)
    with pytest.raises(RecsysError, match="not a recsys GRU4Rec model file"):
        TrainedModel.load(path)
    path.write_text("garbage")
    with pytest.raises(RecsysError, match="not a loadable"):
        TrainedModel.load(path)
    with pytest.raises(RecsysError, match="model file not found"):
        TrainedModel.load(tmp_path / "missing.pt")


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p["state"].update(item_out=torch.zeros(3, 3)),  # a wrong tensor shape
        lambda p: p.update(model_config={"layers": []}),  # a config that does not validate
        lambda p: p.pop("item_ids"),  # no item index
        lambda p: p.update(id_kind="str"),  # ids that are not what the file declares
        lambda p: p.update(item_ids=5),  # an index that is no list
        lambda p: p.update(support=["a"] * 10),  # supports that are no numbers
        lambda p: p.update(item_ids=list(range(9))),  # fewer ids than the network scores
    ],
    ids=["shape", "config", "no-index", "id-kind", "ids-not-a-list", "bad-support", "short"],
)
def test_a_damaged_model_file_is_one_clear_error(
    tmp_path: Path, damage: Callable[[dict[str, Any]], None]
) -> None:
    path = tmp_path / "model.pt"
    _trained(list(range(10))).save(path)
    payload = torch.load(path, weights_only=True)
    damage(payload)
    torch.save(payload, path)
    with pytest.raises(RecsysError, match=f"^{path}: ") as err:
        TrainedModel.load(path)
    assert "\n" not in str(err.value)


def test_a_directory_is_searched_for_its_model_file(tmp_path: Path) -> None:
    nested = tmp_path / "mlflow-model" / "artifacts" / "model"
    nested.mkdir(parents=True)
    _trained([1, 2, 3]).save(nested / "model.pt")
    assert find_model_file(tmp_path / "mlflow-model") == nested / "model.pt"
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecsysError, match="no model.pt in this directory"):
        find_model_file(tmp_path / "empty")


def test_a_model_file_written_before_the_artifact_type_still_loads(tmp_path: Path) -> None:
    """Files of earlier versions carry no id kind, origin or (benchmark files) support."""
    path = tmp_path / "old.pt"
    network = GRU4Rec(4, ModelConfig(layers=[8]))
    old = {
        "format": "recsys-gru4rec",
        "version": 1,
        "n_items": 4,
        "model_config": {"layers": [8]},
        "state": {k: v.detach().clone() for k, v in network.state_dict().items()},
        "item_ids": ["a", "b", "c", "d"],
    }
    torch.save(old, path)
    loaded = TrainedModel.load(path)
    assert loaded.items.id_kind == "str" and loaded.items.support == (1.0,) * 4
    assert (loaded.dataset, loaded.data_fingerprint) == ("", "")
    assert torch.equal(loaded.network.item_out, network.item_out)
