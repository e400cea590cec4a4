"""Short content digests ("sha256:" + 16 hex digits) for provenance and fingerprints."""

from __future__ import annotations

import hashlib
from pathlib import Path

DIGEST_CHARS = 16  # enough to tell files and architectures apart, short enough to read


def bytes_digest(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()[:DIGEST_CHARS]}"


def file_digest(path: Path) -> str:
    """Digest of a file's content, read in 1 MiB blocks (data files can be large)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()[:DIGEST_CHARS]}"
