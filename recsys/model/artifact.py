"""The trained-model artifact: the network, its config and the item index, in one file.

Training builds it, evaluation, the registry, serving and the benchmarks read it; nothing else
knows the file's layout. The file holds tensors and plain values only, so it loads with
``torch.load(weights_only=True)``: a tampered file cannot execute code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from recsys.config import MODEL_FILE, ModelConfig
from recsys.core.atomic import atomic_path
from recsys.core.errors import RecsysError, first_line
from recsys.core.fingerprint import digest
from recsys.data.schema import ITEM, ITEM_IDX, SUPPORT
from recsys.model.gru4rec import GRU4Rec

FILE_FORMAT = "recsys-gru4rec"
# 2: integer ids and supports as tensors (version 1's lists, which load too, cost a third of a
# second of pure-Python unpickling for 43k items). Files without "id_kind" still load.
FILE_VERSION = 2
ID_KINDS = ("int", "str")


def plain_id(value: Any) -> Any:
    """numpy scalars -> Python scalars, so ids serialise to JSON and hash like client ids."""
    return value.item() if isinstance(value, np.generic) else value


@dataclass(frozen=True)
class ItemIndex:
    """Original item id and training support of every item index; ``id_kind`` says whether the
    ids are integers (clients may send them as JSON numbers or strings) or text."""

    ids: tuple[Any, ...]
    support: tuple[float, ...]
    id_kind: str

    @classmethod
    def of(cls, ids: Sequence[Any], support: Sequence[float] | None = None) -> ItemIndex:
        """From ids (and support; default 1 each). The id kind is decided here, once."""
        plain = tuple(plain_id(i) for i in ids)
        numeric = all(isinstance(i, int) and not isinstance(i, bool) for i in plain)
        weights = tuple(float(s) for s in support) if support is not None else (1.0,) * len(plain)
        if len(weights) != len(plain):
            raise RecsysError(f"the item index has {len(plain)} ids but {len(weights)} supports")
        return cls(plain, weights, "int" if numeric else "str")

    @classmethod
    def from_table(cls, items: pl.DataFrame) -> ItemIndex:
        """From a prepared dataset's item table (item_id, item_idx, support)."""
        items = items.sort(ITEM_IDX)
        return cls.of(items[ITEM].to_list(), items[SUPPORT].to_list())

    @property
    def numeric(self) -> bool:
        return self.id_kind == "int"

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class TrainedModel:
    """A trained GRU4Rec with the item index it scores, and where it came from."""

    network: GRU4Rec
    items: ItemIndex
    dataset: str = ""
    data_fingerprint: str = ""
    # the optimiser's state (plain tensors) a warm start continues from, and where the model
    # came from: last_event (ISO time), window, base (recsys/training/warm_start.py)
    optimizer: dict[str, Any] | None = field(default=None, compare=False)
    lineage: dict[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if len(self.items) != self.network.n_items:
            raise RecsysError(
                f"the item index has {len(self.items)} ids but the model scores "
                f"{self.network.n_items} items"
            )

    def save(self, path: Path) -> str:
        """Write atomically; returns the file's fingerprint (what later steps are keyed on)."""
        net = self.network
        payload = {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "n_items": net.n_items,
            "model_config": net.config.model_dump(mode="json"),
            "state": {k: v.detach().cpu() for k, v in net.state_dict().items()},
            "item_ids": _packed_ids(self.items),
            "support": torch.tensor(self.items.support, dtype=torch.float64),
            "id_kind": self.items.id_kind,
            "dataset": self.dataset,
            "data_fingerprint": self.data_fingerprint,
            "optimizer": self.optimizer or {},
            "lineage": dict(self.lineage),
        }
        with atomic_path(Path(path)) as tmp:
            torch.save(payload, tmp)
        return file_fingerprint(Path(path))

    @classmethod
    def load(cls, path: Path, map_location: str | torch.device = "cpu") -> TrainedModel:
        """Read and check a model file; any defect is one clear error naming the file."""
        path = Path(path)
        if not path.is_file():
            raise RecsysError(f"{path}: model file not found")
        try:
            # mmap: no tensor is read under the GIL here (the live service loads a new model
            # on a background thread while it answers); load_state_dict copies them in torch ops
            payload = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not our file"
            raise RecsysError(
                f"{path}: not a loadable recsys model file ({first_line(exc, 200)})"
            ) from None
        if not isinstance(payload, dict) or payload.get("format") != FILE_FORMAT:
            raise RecsysError(f"{path}: not a recsys GRU4Rec model file")
        if "item_ids" not in payload:
            raise RecsysError(f"{path}: the model file has no item index")
        try:
            config = ModelConfig.model_validate(payload["model_config"])
            network = GRU4Rec(int(payload["n_items"]), config, init=False)
            state = dict(payload["state"])
            if network.readout is not None:  # files from before the temperature: τ = 1 ranks
                state.setdefault("readout.log_temperature", torch.zeros(1))  # as they did
            network.load_state_dict(state)
            items = ItemIndex.of(_listed(payload["item_ids"]), _listed(payload.get("support")))
            if payload.get("id_kind", items.id_kind) != items.id_kind:
                raise RecsysError("the item ids are not of the kind the file declares")
            return cls(
                network.eval(),
                items,
                str(payload.get("dataset") or ""),
                str(payload.get("data_fingerprint") or ""),
                _owned(payload.get("optimizer") or None),
                {str(k): str(v) for k, v in (payload.get("lineage") or {}).items()},
            )
        except Exception as exc:  # noqa: BLE001 - a wrong shape, config or index: a damaged file
            raise RecsysError(
                f"{path}: the model file is damaged ({first_line(exc, 200)})"
            ) from None


def _packed_ids(items: ItemIndex) -> torch.Tensor | list[Any]:
    """Integer ids as one int64 tensor (what loads fast); text ids, or integers beyond int64,
    as a list."""
    if items.numeric and all(-(2**63) <= i < 2**63 for i in items.ids):
        return torch.tensor(items.ids, dtype=torch.int64)
    return list(items.ids)


def _owned(state: Any) -> Any:
    """The optimiser state copied out of the memory-mapped file: kept, it would stay mapped as
    long as the model lives, and a file rewritten in place (not replaced) would change under it."""
    if isinstance(state, torch.Tensor):
        return state.clone()
    if isinstance(state, dict):
        return {key: _owned(value) for key, value in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(_owned(value) for value in state)
    return state


def _listed(values: Any) -> Any:
    return values.tolist() if isinstance(values, torch.Tensor) else values


def file_fingerprint(path: Path) -> str:
    """The first 16 hex digits of the file's SHA-256."""
    return digest([Path(path).read_bytes()])


def find_model_file(path: Path) -> Path:
    """A model file given as itself or as a directory holding one (an MLflow model directory)."""
    if not path.is_dir():
        return path
    candidates = [path / MODEL_FILE, *sorted(path.glob(f"artifacts/**/{MODEL_FILE}"))]
    found = [p for p in candidates if p.is_file()]
    if not found:
        raise RecsysError(f"{path}: no {MODEL_FILE} in this directory")
    return found[0]
