"""The one sha256 scheme: every checksum and fingerprint cltrace stores is `sha256_hex` of a sequence
of byte parts, and JSON goes in as `canonical_json`.

What each stored hash feeds in stays as it was when those files were first written (a transcoder's
fingerprint, for one, hashes its config as `json.dumps(sort_keys=True)` with the default spacing),
so files on disk keep their meaning; only the code that computes them is shared.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

Part = bytes | memoryview | str


def sha256_hex(parts: Iterable[Part] | Part) -> str:
    """Hex sha256 of `parts` fed in order (a single bytes or str is one part; str as UTF-8)."""
    if isinstance(parts, (bytes, memoryview, str)):
        parts = [parts]
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
    return h.hexdigest()


def canonical_json(obj: Any) -> bytes:
    """`obj` as JSON with sorted keys and no spaces (floats round-trip exactly, so a re-read file
    hashes the same)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def json_digest(obj: Any) -> str:
    """sha256 of `obj` as canonical JSON."""
    return sha256_hex(canonical_json(obj))


def file_sha256(path: str | Path, chunk: int = 16 * 2**20) -> str:
    """sha256 of a file, read in chunks (never the whole file in memory)."""

    def blocks() -> Iterable[bytes]:
        with open(path, "rb") as fh:
            while block := fh.read(chunk):
                yield block

    return sha256_hex(blocks())


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's raw little-endian bytes, flattened [numel * itemsize] (a view where it can be)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data


def transcoder_fingerprint(tc: Any) -> str:
    """sha256 of a transcoder's config and weights: identifies it whatever file it came from (feature
    stores and graphs record it, so that pages are only shown for the transcoder they describe)."""

    def parts() -> Iterable[Part]:
        yield json.dumps(tc.config.to_dict(), sort_keys=True)
        for name, t in sorted(tc.state_dict().items()):
            yield name
            yield str(tuple(t.shape))
            yield tensor_bytes(t)

    return sha256_hex(parts())


__all__ = ["canonical_json", "file_sha256", "json_digest", "sha256_hex", "tensor_bytes", "transcoder_fingerprint"]
