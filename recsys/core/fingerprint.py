"""Fingerprints: 16 hex digits of SHA-256, the one spelling of "what this content is".

Step keys, model files and prepared datasets are all named this way, so a fingerprint in a
marker file, an MLflow tag or a log line can be compared with any other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any


def digest(chunks: Iterable[bytes]) -> str:
    """The fingerprint of the chunks' concatenation (read one at a time: files can be large)."""
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()[:16]


def tensor_key(tensor: Any) -> tuple[Any, ...]:
    """Which contents a tensor holds now, without reading them, for caches of what is derived
    from weights (the ranker's low-bit copies, a click's transposed weights): in-place writes
    move its version; ``.to()``, ``.double()`` and ``t.data = ...`` keep the object and the
    version but replace the storage."""
    return (id(tensor), tensor.data_ptr(), tensor.dtype, tensor.device, tensor._version)
