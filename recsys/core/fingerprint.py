"""Fingerprints: 16 hex digits of SHA-256, the one spelling of "what this content is".

Step keys, model files and prepared datasets are all named this way, so a fingerprint in a
marker file, an MLflow tag or a log line can be compared with any other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def digest(chunks: Iterable[bytes]) -> str:
    """The fingerprint of the chunks' concatenation (read one at a time: files can be large)."""
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()[:16]
