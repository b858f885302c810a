"""The activation store's format on disk: the manifest and its checks, the shards, and reading a store.

What a store folder holds is described in `cltrace.data.store`, which writes it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from cltrace.atomic import atomic_write_text
from cltrace.errors import CltraceError, is_int
from cltrace.fingerprint import file_sha256, json_digest, sha256_hex
from cltrace.model.load import LoadedModel

MANIFEST = "manifest.json"
STORE_FORMAT = "cltrace-activation-store"
STORE_VERSION = 2
#: Manifest versions this cltrace reads; version 1 has no manifest ``sha256`` (its shards have theirs).
STORE_READABLE = (1, 2)
STORE_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16}
SHARD_BYTES = 256 * 2**20
"""Aim of a shard's size when the caller does not fix its contexts (large enough that the
per-file costs vanish, small enough that a shard and a shuffle buffer fit in memory together)."""

#: Settings that define what a store holds: a harvest only resumes or extends a store whose
#: settings are all equal (plus the model fingerprint).
SETTING_KEYS = ("model", "source", "text_column", "n_ctx", "heldout_fraction", "split_seed", "bos_id", "sep_id",
                "first_position", "dtype", "harvest_dtype")
#: Settings added after the first stores were written, with the value those stores were harvested with.
LATER_SETTINGS = {"mix_contexts": 1}


def model_fingerprint(loaded: LoadedModel) -> dict[str, Any]:
    """Name, shape and a hash of a few weights of a model (cheap; tells different models apart)."""
    params = list(loaded.model.parameters())
    sampled = [p.detach().reshape(-1)[:4096].to(torch.float64).cpu().numpy().tobytes() for p in params[:3] + params[-3:]]
    return {
        "model": loaded.name,
        "n_layers": loaded.n_layers,
        "d_model": loaded.d_model,
        "weights_sha256": sha256_hex(sampled)[:16],
    }


def describe_fingerprint(fp: dict[str, Any]) -> str:
    """A model fingerprint in words, for messages."""
    return (f"{fp.get('model')}, {fp.get('n_layers')} layers, d_model {fp.get('d_model')}, "
            f"weights {fp.get('weights_sha256')}")


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of a manifest's keys other than ``sha256`` itself, as canonical JSON (sorted keys, no
    spaces); floats survive the JSON round trip exactly, so a re-read manifest hashes the same."""
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    return json_digest(body)


def shard_name(index: int) -> str:
    """File name of shard `index`."""
    return f"shard-{index:05d}.safetensors"


def bytes_per_token(n_layers: int, d_model: int, dtype: str) -> int:
    """Disk bytes of one stored token (x and y of every layer), headers left out."""
    return 2 * n_layers * d_model * torch.finfo(STORE_DTYPES[dtype]).bits // 8


class ActivationStore:
    """Read access to a store folder: its manifest, verified shards, and contexts by index."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        m = self.manifest
        self.n_layers: int = m["n_layers"]
        self.d_model: int = m["d_model"]
        self.n_ctx: int = m["settings"]["n_ctx"]
        self.tokens_per_context: int = m["positions_per_context"]  # the sink positions are not stored
        self.shards: list[dict[str, Any]] = m["shards"]
        # first context of every shard, and one past the last: [n_shards + 1]
        self.offsets = [0]
        for s in self.shards:
            self.offsets.append(self.offsets[-1] + s["contexts"])
        self._cached: tuple[int, torch.Tensor, torch.Tensor] | None = None

    # -- what the store holds -----------------------------------------------------------------

    @property
    def settings(self) -> dict[str, Any]:
        """What was harvested: model and source specs, text column, packing, dtypes."""
        return self.manifest["settings"]

    @property
    def fingerprint(self) -> dict[str, Any]:
        """The model fingerprint of the harvest (see `model_fingerprint`)."""
        return self.manifest["fingerprint"]

    @property
    def store_id(self) -> str:
        """A random id drawn when the store was created: a re-harvested store gets another."""
        return self.manifest["store_id"]

    @property
    def contexts(self) -> int:
        """Contexts listed in the manifest."""
        return self.offsets[-1]

    @property
    def tokens(self) -> int:
        """Stored tokens (positions), all shards together."""
        return self.contexts * self.tokens_per_context

    @property
    def complete(self) -> bool:
        """Whether the harvest reached its target (or the end of the text)."""
        return bool(self.manifest["complete"])

    def disk_bytes(self) -> int:
        """Bytes of the listed shards on disk."""
        return sum(s["bytes"] for s in self.shards)

    def scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-layer factors [n_layers] that scale x and y to mean norm √d_model over the whole store."""
        stats = self.manifest["stats"]
        return torch.tensor(stats["scale_x"]), torch.tensor(stats["scale_y"])

    def check_model(self, fingerprint: dict[str, Any]) -> None:
        """Refuse (one line) a model other than the one the store was harvested from."""
        if fingerprint != self.fingerprint:
            raise CltraceError(
                f"activation store '{self.path}' was harvested from another model ({describe_fingerprint(self.fingerprint)}) "
                f"than this one ({describe_fingerprint(fingerprint)}); use the store's model "
                f"('{self.settings['model']}') or harvest a store for this one"
            )

    # -- reading -------------------------------------------------------------------------------

    def read_shard(self, index: int, verify: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of shard `index`, each [contexts * positions, n_layers, d_model] in the store dtype.

        With `verify`, the file's size and sha256 are checked against the manifest first: a damaged
        or truncated shard is refused with a message naming it, never read as good.
        """
        entry = self.shards[index]
        path = self.path / entry["file"]
        redo = REDO_STORE
        if not path.is_file():
            raise CltraceError(f"activation store shard {path} is missing; {redo}")
        size = path.stat().st_size
        if verify:
            if size != entry["bytes"]:
                raise CltraceError(
                    f"activation store shard {path} is damaged: {size:,} bytes, the manifest says {entry['bytes']:,}; {redo}"
                )
            digest = file_sha256(path)
            if digest != entry["sha256"]:
                raise CltraceError(
                    f"activation store shard {path} is damaged: its sha256 {digest[:12]}… differs from the "
                    f"manifest's {entry['sha256'][:12]}…; {redo}"
                )
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CltraceError(f"activation store shard {path} cannot be read ({text}); it is damaged: {redo}") from None
        x, y = tensors.get("x"), tensors.get("y")
        want = (entry["contexts"] * self.tokens_per_context, self.n_layers, self.d_model)
        dtype = STORE_DTYPES[self.settings["dtype"]]
        if x is None or y is None or tuple(x.shape) != want or tuple(y.shape) != want or x.dtype != dtype or y.dtype != dtype:
            raise CltraceError(f"activation store shard {path} does not hold x and y of shape {want} in {dtype}; "
                               f"it is damaged: {redo}")
        return x, y

    def read_contexts(self, start: int, count: int, verify: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of contexts start .. start + count - 1, taken cyclically (context i is i mod contexts).

        Each is [count * positions, n_layers, d_model] in the store dtype. The last shard read is
        kept in memory, so reading consecutive ranges loads (and verifies) every shard once a pass.
        """
        if self.contexts == 0:
            raise CltraceError(f"activation store '{self.path}' holds no activations; run `cltrace harvest` into it")
        T = self.tokens_per_context
        xs, ys = [], []
        c = start
        while c < start + count:
            local = c % self.contexts
            shard = next(i for i in range(len(self.shards)) if self.offsets[i] <= local < self.offsets[i + 1])
            if self._cached is None or self._cached[0] != shard:
                self._cached = None  # free the previous shard before loading the next
                self._cached = (shard, *self.read_shard(shard, verify))
            _, x, y = self._cached
            take = min(start + count - c, self.offsets[shard + 1] - local)
            lo = (local - self.offsets[shard]) * T
            xs.append(x[lo : lo + take * T])
            ys.append(y[lo : lo + take * T])
            c += take
        if len(xs) == 1:
            return xs[0], ys[0]  # a view of the cached shard (nothing writes to buffers)
        return torch.cat(xs), torch.cat(ys)


REDO_STORE = "delete the store and run `cltrace harvest` again"


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the store at `path`, checked against its ``sha256`` and for well-formed
    fields, or a one-line error saying what is wrong."""
    file = path / MANIFEST
    if not path.is_dir():
        raise CltraceError(f"no activation store at '{path}'; write one with `cltrace harvest -o {path}`")
    if not file.is_file():
        raise CltraceError(f"'{path}' holds no activation store ({MANIFEST} is missing); write one with `cltrace harvest`")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad UTF-8, bad JSON, a huge integer
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CltraceError(f"{file} is not valid JSON ({text}); it is damaged: {REDO_STORE}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != STORE_FORMAT:
        raise CltraceError(f"{file} is not an activation store manifest")
    version = manifest.get("version")
    if not is_int(version) or version not in STORE_READABLE:
        newer = is_int(version) and version > STORE_VERSION
        raise CltraceError(
            f"activation store '{path}' has version {version!r}; this cltrace reads versions "
            f"{', '.join(map(str, STORE_READABLE))}: "
            + ("upgrade cltrace, or harvest it again" if newer else f"the manifest is damaged: {REDO_STORE}")
        )
    # Checked before any field is interpreted: any damage to the manifest reads as this one message.
    recorded = manifest.get("sha256")
    if recorded is None and version >= 2:
        raise CltraceError(f"{file} has no sha256, which version {version} requires: it is damaged; {REDO_STORE}")
    if recorded is not None and recorded != manifest_digest(manifest):
        raise CltraceError(f"{file} does not match its sha256: it is damaged or was edited; {REDO_STORE}")
    problem = _manifest_problem(manifest)
    if problem:
        raise CltraceError(f"{file} is damaged ({problem}); {REDO_STORE}")
    return manifest


def _is_num(v: Any) -> bool:
    # Not required finite: an fp16 store of huge activations can hold inf norms, and says so.
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_SHARD_FILE = re.compile(r"shard-\d{5,}\.safetensors")


def _manifest_problem(m: dict[str, Any]) -> str | None:
    """What is wrong with the fields of manifest `m` (a version 1 one has no checksum), or None."""

    def count(v: Any, least: int = 0) -> bool:
        return is_int(v) and v >= least

    def floats(v: Any, n: int) -> bool:
        return isinstance(v, list) and len(v) == n and all(_is_num(x) for x in v)

    if not isinstance(m.get("store_id"), str):
        return "store_id is not a string"
    settings = m.get("settings")
    if not isinstance(settings, dict) or any(k not in settings for k in SETTING_KEYS):
        return "settings lack keys"
    if settings["dtype"] not in STORE_DTYPES or not count(settings["n_ctx"], 1):
        return "settings hold an unknown dtype or a bad n_ctx"
    if not isinstance(m.get("fingerprint"), dict):
        return "fingerprint is not an object"
    for key in ("n_layers", "d_model", "positions_per_context"):
        if not count(m.get(key), 1):
            return f"{key} is not a positive integer"
    for key in ("target_tokens", "contexts", "tokens"):
        if not count(m.get(key)):
            return f"{key} is not an integer >= 0"
    for key in ("complete", "source_exhausted"):
        if not isinstance(m.get(key), bool):
            return f"{key} is not true or false"
    if not (m.get("position") is None or isinstance(m.get("position"), dict)):
        return "position is neither null nor an object"
    shards, L = m.get("shards"), m["n_layers"]
    if not isinstance(shards, list):
        return "shards is not a list"
    for i, s in enumerate(shards):
        ok = (isinstance(s, dict) and isinstance(s.get("file"), str) and _SHARD_FILE.fullmatch(s["file"]) is not None
              and count(s.get("contexts"), 1) and count(s.get("bytes")) and isinstance(s.get("sha256"), str)
              and floats(s.get("x_norm_sum"), L) and floats(s.get("y_norm_sum"), L))
        if not ok:
            return f"shard entry {i} is malformed"
    if sum(s["contexts"] for s in shards) != m["contexts"] or m["tokens"] != m["contexts"] * m["positions_per_context"]:
        return "its context and token counts disagree with its shards"
    stats = m.get("stats")
    if not isinstance(stats, dict) or stats.get("tokens") != m["tokens"]:
        return "stats do not match its tokens"
    if m["tokens"] and not (floats(stats.get("scale_x"), L) and floats(stats.get("scale_y"), L)):
        return "stats lack per-layer scales"
    return None


def write_manifest_file(path: Path, manifest: dict[str, Any]) -> None:
    """Write `manifest` as the store at `path`'s manifest.json, atomically, stamped with the current
    version and its ``sha256`` (both set in `manifest` too); a version 1 store extended gains both."""
    manifest["version"] = STORE_VERSION
    manifest["sha256"] = manifest_digest(manifest)
    atomic_write_text(path / MANIFEST, json.dumps(manifest, indent=1) + "\n", what="activation store manifest")


__all__ = [
    "LATER_SETTINGS", "MANIFEST", "SETTING_KEYS", "SHARD_BYTES", "STORE_DTYPES", "STORE_FORMAT", "STORE_VERSION",
    "ActivationStore", "bytes_per_token", "describe_fingerprint", "file_sha256", "manifest_digest", "model_fingerprint",
    "read_manifest", "shard_name", "write_manifest_file",
]
