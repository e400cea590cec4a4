"""Content digests.

- Provenance and fingerprints: "sha256:" + 16 hex digits (`bytes_digest`, `file_digest`).
- Activations shards: XXH3-128 (xxHash, "xxh3-128:" + 32 hex digits), fast enough (memory speed) to
  be computed by the writer on the rows it writes and checked on every read of the rows: one running
  hash per dataset of a shard (`RowsDigest`), and the shard's digest made from theirs
  (`shard_digest`), so that reading one dataset checks it without reading the others.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import xxhash

DIGEST_CHARS = 16  # enough to tell files and architectures apart, short enough to read
SHARD_DIGEST_PREFIX = "xxh3-128:"


def bytes_digest(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()[:DIGEST_CHARS]}"


def file_digest(path: Path) -> str:
    """Digest of a file's content, read in 1 MiB blocks (data files can be large)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()[:DIGEST_CHARS]}"


class RowsDigest:
    """XXH3-128 of one dataset's rows, fed block after block in row order (the bytes as stored)."""

    def __init__(self) -> None:
        self._hash = xxhash.xxh3_128()

    def update(self, block: np.ndarray) -> None:
        self._hash.update(np.ascontiguousarray(block))

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def shard_digest(dataset_digests: dict[str, str]) -> str:
    """A shard's digest: XXH3-128 of its datasets' digests (name=hex, in name order)."""
    listed = ";".join(f"{name}={hexdigest}" for name, hexdigest in sorted(dataset_digests.items()))
    return SHARD_DIGEST_PREFIX + xxhash.xxh3_128_hexdigest(listed.encode())


def is_shard_digest(digest: str | None) -> bool:
    """Whether a manifest's digest is of this kind (not an older folder's "sha256:" of the whole file)."""
    return digest is not None and digest.startswith(SHARD_DIGEST_PREFIX)
