"""The sharded on-disk activation store: harvest once, train many times.

A store is a folder:

    manifest.json          what the activations are (model fingerprint, text source, packing, dtype),
                           the shard list (contexts, bytes, sha256 and per-layer norm sums of each),
                           per-layer normalisation statistics, and the exact text position after the
                           last stored context (where a killed or extended harvest continues)
    shard-00000.safetensors  `x` and `y`, each [contexts * positions, n_layers, d_model] in bf16
    shard-00001.safetensors  or fp16: the transcoder inputs (resid_mid) and targets (MLP outputs)
    ...

Every shard is written to a temporary file, hashed, fsynced and renamed; only then is the manifest
(also written atomically, and carrying a ``sha256`` of its own other keys, so that a damaged or
hand-edited manifest is refused rather than read as another store) extended to list it. The manifest is the only truth: a shard it does not
list (a harvest killed between the rename and the manifest update) is removed when the harvest
resumes, and a listed shard whose size or sha256 differs is refused when read. So a store never
holds a half-written shard that reads as good.

Contexts are packed exactly as training's stream packs them (`cltrace.data.packing`, train split,
and harvested by the same `Harvester`, which leaves out the first positions of every context (the
attention sinks: `positions` = n_ctx - first_position are kept), so a store of a text source holds,
context for context, the activations a streaming run would harvest from it.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import sys
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cltrace.atomic import atomic_path, atomic_write_text
from cltrace.data.harvest import Harvester
from cltrace.data.packing import PackPosition, model_packing, pack_batches
from cltrace.errors import CltraceError, is_int
from cltrace.fingerprint import file_sha256, json_digest, sha256_hex
from cltrace.model.load import LoadedModel

log = logging.getLogger(__name__)

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
    heads = (p.detach().reshape(-1)[:4096].to(torch.float64).cpu().numpy().tobytes() for p in params[:3] + params[-3:])
    return {
        "model": loaded.name,
        "n_layers": loaded.n_layers,
        "d_model": loaded.d_model,
        "weights_sha256": sha256_hex(heads)[:16],
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


# -- writing -----------------------------------------------------------------------------------------


def _stats(shards: list[dict[str, Any]], tokens_per_context: int, d_model: int, n_layers: int) -> dict[str, Any]:
    """Per-layer normalisation statistics over the listed shards (as the trainer's `estimate_scales`)."""
    tokens = sum(s["contexts"] for s in shards) * tokens_per_context
    if tokens == 0:
        return {"tokens": 0}
    x_norm = [sum(s["x_norm_sum"][l] for s in shards) / tokens for l in range(n_layers)]
    y_norm = [sum(s["y_norm_sum"][l] for s in shards) / tokens for l in range(n_layers)]
    root = math.sqrt(d_model)
    return {
        "tokens": tokens,
        "x_mean_norm": x_norm,
        "y_mean_norm": y_norm,
        "scale_x": [root / max(v, 1e-12) for v in x_norm],
        "scale_y": [root / max(v, 1e-12) for v in y_norm],
    }


def _norm_sums(t: torch.Tensor, chunk: int = 2048) -> list[float]:
    """Σ over tokens of each layer's vector norm, of t [tokens, n_layers, d_model] (fp32 math, fp64 sums)."""
    total = torch.zeros(t.shape[1], dtype=torch.float64)
    for i in range(0, t.shape[0], chunk):
        total += torch.linalg.vector_norm(t[i : i + chunk], dim=-1, dtype=torch.float32).sum(0, dtype=torch.float64)
    return total.tolist()


def _prepare_store_dir(out: Path, settings: dict[str, Any], fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of a store at `out` to continue, None for a new store; refuses anything else."""
    if out.exists() and not out.is_dir():
        raise CltraceError(f"activation store '{out}' is a file; give a folder")

    def is_temp(p: Path) -> bool:
        """A temporary file of a write a kill interrupted: cltrace.atomic's `.NAME.XXXX.tmp`, or the
        `.tmpXXXXXX` safetensors (0.8) writes a shard through before renaming it."""
        return p.is_file() and (p.name.startswith(".tmp") or (p.name.startswith(".") and p.name.endswith(".tmp")))

    if not out.is_dir() or all(is_temp(p) for p in out.iterdir()):
        for p in out.iterdir() if out.is_dir() else ():
            p.unlink()  # a harvest killed while writing its first manifest left only this
        return None
    if not (out / MANIFEST).is_file():
        raise CltraceError(f"'{out}' is not empty and holds no activation store; choose a new or empty folder")
    manifest = read_manifest(out)
    if not manifest["shards"]:
        # a harvest that failed (e.g. too little text) or was killed before its first shard was
        # listed left nothing to keep: its temporary and unlisted files go too
        for p in out.iterdir():
            if is_temp(p) or (p.is_file() and p.name.startswith("shard-") and p.name.endswith(".safetensors")):
                p.unlink()
        return None
    if manifest["fingerprint"] != fingerprint:
        raise CltraceError(
            f"activation store '{out}' holds activations of another model ({describe_fingerprint(manifest['fingerprint'])}); "
            "choose a new folder"
        )
    had = {**LATER_SETTINGS, **manifest["settings"]}
    diff = [f"{k}={had.get(k)!r}->{settings[k]!r}" for k in (*SETTING_KEYS, *LATER_SETTINGS) if had.get(k) != settings[k]]
    if diff:
        raise CltraceError(
            f"activation store '{out}' was harvested with other settings ({', '.join(diff[:4])}); "
            "choose a new folder, or harvest with the store's settings to extend it"
        )
    # Anything the manifest does not list is debris of a killed harvest: temporary files, or a shard
    # renamed into place before the manifest could list it. It is rewritten from the same position.
    listed = {s["file"] for s in manifest["shards"]}
    for p in out.iterdir():
        debris = is_temp(p) or (
            p.name.startswith("shard-") and p.name.endswith(".safetensors") and p.name not in listed)
        if debris and p.is_file():
            log.info("removing %s (left by an interrupted harvest)", p)
            p.unlink()
    return manifest


def harvest_to_store(
    loaded: LoadedModel,
    source: Iterable[str],
    out: str | Path,
    tokens: int,
    *,
    model_spec: str,
    source_spec: str,
    text_column: str = "text",
    tokenize: Callable[[str], Sequence[int]] | None = None,
    n_ctx: int = 128,
    dtype: str = "bfloat16",
    harvest_dtype: str = "float32",
    shard_contexts: int | None = None,
    harvest_batch: int = 16,
    heldout_fraction: float = 0.01,
    split_seed: int = 0,
    bos_id: int | None = None,
    sep_id: int | None = None,
    mix_contexts: int = 1,
    progress: bool = True,
) -> ActivationStore:
    """Harvest `tokens` training tokens of `source` through `loaded` into the store at `out`.

    A store already at `out` with the same model and settings is continued from its exact text
    position (after a kill) or extended (a larger `tokens`); a store of another model or other
    settings, or a non-empty folder that is no store, is refused. `model_spec` and `source_spec`
    are recorded so that `cltrace train --store` can reopen the same model and held-out text.
    `mix_contexts` > 1 stores the contexts in pools of that many, each shuffled
    (`PackConfig.mix_contexts`), so that a run reading the store in order sees mixed text.
    If the text runs out first, the store is completed with what there was (and says so).
    """
    if dtype not in STORE_DTYPES:
        raise CltraceError(f"store dtype must be one of {', '.join(STORE_DTYPES)}, got {dtype!r}")
    if harvest_dtype not in ("float32", "bfloat16"):
        raise CltraceError(f"harvest dtype must be float32 or bfloat16, got {harvest_dtype!r}")
    if tokens < 1:
        raise CltraceError(f"tokens must be at least 1, got {tokens}")
    out = Path(out)
    tokenize, pack = model_packing(
        loaded, n_ctx, 1, tokenize=tokenize, bos_id=bos_id, sep_id=sep_id, split="train",
        heldout_fraction=heldout_fraction, split_seed=split_seed, mix_contexts=mix_contexts,
    )
    harvester = Harvester(loaded, dtype=STORE_DTYPES[dtype], max_batch=harvest_batch,
                          autocast_bf16=harvest_dtype == "bfloat16")
    # before the disk-space estimate, which an absurd n_ctx turns into a misleading "not enough space"
    if n_ctx > loaded.max_context:
        raise CltraceError(
            f"n_ctx {n_ctx} is larger than the model's context of {loaded.max_context} tokens: "
            f"lower --n-ctx to {loaded.max_context} or less"
        )
    if n_ctx <= harvester.first_position:
        raise CltraceError(
            f"n_ctx {n_ctx} leaves no position to store (the first {harvester.first_position} of each context are "
            f"not harvested): raise --n-ctx to at least {harvester.first_position + 1}"
        )
    T = harvester.positions_per_context(n_ctx)  # stored tokens per context
    L, d = loaded.n_layers, loaded.d_model
    per_token = bytes_per_token(L, d, dtype)
    if shard_contexts is None:
        shard_contexts = max(1, SHARD_BYTES // (per_token * T))
    if shard_contexts < 1:
        raise CltraceError(f"shard_contexts must be at least 1, got {shard_contexts}")
    settings = {"model": model_spec, "source": source_spec, "text_column": text_column, "n_ctx": n_ctx,
                "heldout_fraction": heldout_fraction, "split_seed": split_seed, "bos_id": pack.bos_id,
                "sep_id": pack.sep_id, "first_position": harvester.first_position, "dtype": dtype,
                "harvest_dtype": harvest_dtype, "mix_contexts": mix_contexts}
    fingerprint = model_fingerprint(loaded)
    manifest = _prepare_store_dir(out, settings, fingerprint)
    wanted = math.ceil(tokens / T)  # contexts
    if manifest is None:
        manifest = {
            "format": STORE_FORMAT, "version": STORE_VERSION, "store_id": uuid.uuid4().hex,
            "settings": settings, "fingerprint": fingerprint, "n_layers": L, "d_model": d, "positions_per_context": T,
            "target_tokens": tokens, "contexts": 0, "tokens": 0, "position": None,
            "complete": False, "source_exhausted": False, "shards": [], "stats": {"tokens": 0},
        }
    done = manifest["contexts"]
    if manifest["source_exhausted"] and wanted > done:
        log.warning("the text source ran out when this store was harvested: it holds all %d tokens of it", manifest["tokens"])
        wanted = done
    manifest["target_tokens"] = max(tokens, manifest["tokens"])
    manifest["complete"] = done >= wanted
    out.mkdir(parents=True, exist_ok=True)

    free = shutil.disk_usage(out).free
    need = (wanted - done) * T * per_token
    if need > free:
        raise CltraceError(
            f"the store needs about {need / 1e9:.1f} GB more ({per_token:,} bytes per token) but '{out}' has "
            f"{free / 1e9:.1f} GB free; lower --tokens or choose another disk"
        )

    def write_manifest() -> None:
        manifest["contexts"] = sum(s["contexts"] for s in manifest["shards"])
        manifest["tokens"] = manifest["contexts"] * T
        manifest["stats"] = _stats(manifest["shards"], T, d, L)
        write_manifest_file(out, manifest)

    write_manifest()
    if done >= wanted:
        return ActivationStore(out)

    start = PackPosition.from_dict(manifest["position"]) if manifest["position"] else None
    contexts = pack_batches(source, tokenize, pack, start=start)  # one context per item, each with its position
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=wanted * T, initial=done * T, unit="tok", unit_scale=True, file=sys.stderr,
                   dynamic_ncols=True, desc="harvesting")
    def write_shard(index: int, x: torch.Tensor, y: torch.Tensor, n_rows: int, position: PackPosition, complete: bool) -> None:
        """Shard file (temp, hash, fsync, rename), then the manifest that lists it: in this order only."""
        name = shard_name(index)
        with atomic_path(out / name, what="activation store shard") as tmp:
            save_file({"x": x, "y": y}, str(tmp), metadata={"contexts": str(n_rows)})
            entry = {"file": name, "contexts": n_rows, "tokens": n_rows * T, "bytes": tmp.stat().st_size,
                     "sha256": file_sha256(tmp), "x_norm_sum": _norm_sums(x), "y_norm_sum": _norm_sums(y)}
        manifest["shards"].append(entry)
        manifest["position"] = position.to_dict()
        manifest["complete"] = complete
        write_manifest()
        if bar is not None:
            bar.update(n_rows * T)

    # One writer thread: a shard is written, hashed and fsynced while the model harvests the next one
    # (file I/O and hashing release the GIL), so the harvest runs at about the forward pass's speed.
    # At most one shard waits to be written, so memory holds two shards at most.
    pending: Future[None] | None = None
    index = len(manifest["shards"])
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer") as writer:
            while done < wanted:
                rows, position = [], None
                for batch in contexts:
                    rows.append(batch.tokens[0])
                    position = batch.position
                    if len(rows) == min(shard_contexts, wanted - done):
                        break
                if not rows:
                    manifest["source_exhausted"] = True
                    log.warning("the text source ran out after %d tokens (of %d asked): the store holds them all",
                                done * T, wanted * T)
                    break
                x, y = harvester.harvest(torch.stack(rows))  # each [len(rows) * T, L, d] in the store dtype
                if pending is not None:
                    pending.result()  # a failed write stops the harvest here, with its own message
                done += len(rows)
                pending = writer.submit(write_shard, index, x, y, len(rows), position, done >= wanted)
                index += 1
            if pending is not None:
                pending.result()
        if manifest["source_exhausted"]:
            manifest["complete"] = True
            write_manifest()
    finally:
        if bar is not None:
            bar.close()
    return ActivationStore(out)


__all__ = [
    "MANIFEST",
    "STORE_DTYPES",
    "ActivationStore",
    "bytes_per_token",
    "describe_fingerprint",
    "file_sha256",
    "harvest_to_store",
    "manifest_digest",
    "model_fingerprint",
    "read_manifest",
    "write_manifest_file",
]
