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

import logging
import math
import shutil
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from cltrace.atomic import atomic_path
from cltrace.data.harvest import Harvester
from cltrace.data.packing import PackPosition, model_packing, pack_batches
from cltrace.data.store_format import (
    LATER_SETTINGS,
    MANIFEST,
    SETTING_KEYS,
    SHARD_BYTES,
    STORE_DTYPES,
    STORE_FORMAT,
    STORE_VERSION,
    ActivationStore,
    bytes_per_token,
    describe_fingerprint,
    file_sha256,
    manifest_digest,
    model_fingerprint,
    read_manifest,
    shard_name,
    write_manifest_file,
)
from cltrace.errors import CltraceError
from cltrace.model.load import LoadedModel

log = logging.getLogger(__name__)

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
    _check_dtypes(dtype, harvest_dtype, tokens)
    out = Path(out)
    tokenize, pack = model_packing(
        loaded, n_ctx, 1, tokenize=tokenize, bos_id=bos_id, sep_id=sep_id, split="train",
        heldout_fraction=heldout_fraction, split_seed=split_seed, mix_contexts=mix_contexts,
    )
    harvester = Harvester(loaded, dtype=STORE_DTYPES[dtype], max_batch=harvest_batch,
                          autocast_bf16=harvest_dtype == "bfloat16")
    T = _positions(loaded, harvester, n_ctx)  # stored tokens per context
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
    manifest, done, wanted = _open_manifest(out, settings, model_fingerprint(loaded), L, d, T, tokens, per_token)
    writer = _ShardWriter(out, manifest, T, d, L)
    writer.write_manifest()
    if done >= wanted:
        return ActivationStore(out)
    start = PackPosition.from_dict(manifest["position"]) if manifest["position"] else None
    contexts = pack_batches(source, tokenize, pack, start=start)  # one context per item, each with its position
    _harvest_shards(writer, harvester, contexts, done, wanted, shard_contexts, progress)
    return ActivationStore(out)


def _check_dtypes(dtype: str, harvest_dtype: str, tokens: int) -> None:
    if dtype not in STORE_DTYPES:
        raise CltraceError(f"store dtype must be one of {', '.join(STORE_DTYPES)}, got {dtype!r}")
    if harvest_dtype not in ("float32", "bfloat16"):
        raise CltraceError(f"harvest dtype must be float32 or bfloat16, got {harvest_dtype!r}")
    if tokens < 1:
        raise CltraceError(f"tokens must be at least 1, got {tokens}")


def _positions(loaded: LoadedModel, harvester: Harvester, n_ctx: int) -> int:
    """The positions stored per context of n_ctx tokens; CltraceError where there are none or n_ctx is too long."""
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
    return harvester.positions_per_context(n_ctx)


def _open_manifest(out: Path, settings: dict[str, Any], fingerprint: dict[str, Any], L: int, d: int, T: int,
                   tokens: int, per_token: int) -> tuple[dict[str, Any], int, int]:
    """The manifest to write (the store's at `out`, or a new one), the contexts it holds and the contexts wanted;
    refuses a disk without room for the rest."""
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
    return manifest, done, wanted


class _ShardWriter:
    """Writes shards and the manifest that lists them, in that order only."""

    def __init__(self, out: Path, manifest: dict[str, Any], T: int, d: int, L: int) -> None:
        self.out, self.manifest, self.T, self.d, self.L = out, manifest, T, d, L
        self.bar: Any = None

    def write_manifest(self) -> None:
        manifest, T = self.manifest, self.T
        manifest["contexts"] = sum(s["contexts"] for s in manifest["shards"])
        manifest["tokens"] = manifest["contexts"] * T
        manifest["stats"] = _stats(manifest["shards"], T, self.d, self.L)
        write_manifest_file(self.out, manifest)

    def write_shard(self, index: int, x: torch.Tensor, y: torch.Tensor, n_rows: int, position: PackPosition, complete: bool) -> None:
        """Shard file (temp, hash, fsync, rename), then the manifest that lists it: in this order only."""
        manifest, T = self.manifest, self.T
        name = shard_name(index)
        with atomic_path(self.out / name, what="activation store shard") as tmp:
            save_file({"x": x, "y": y}, str(tmp), metadata={"contexts": str(n_rows)})
            entry = {"file": name, "contexts": n_rows, "tokens": n_rows * T, "bytes": tmp.stat().st_size,
                     "sha256": file_sha256(tmp), "x_norm_sum": _norm_sums(x), "y_norm_sum": _norm_sums(y)}
        manifest["shards"].append(entry)
        manifest["position"] = position.to_dict()
        manifest["complete"] = complete
        self.write_manifest()
        if self.bar is not None:
            self.bar.update(n_rows * T)


def _harvest_shards(writer: _ShardWriter, harvester: Harvester, contexts: Iterator[Any], done: int, wanted: int,
                    shard_contexts: int, progress: bool) -> None:
    """Harvest contexts into shards until `wanted` contexts are stored or the text runs out."""
    manifest, T = writer.manifest, writer.T
    if progress:
        from tqdm import tqdm

        writer.bar = tqdm(total=wanted * T, initial=done * T, unit="tok", unit_scale=True, file=sys.stderr,
                          dynamic_ncols=True, desc="harvesting")
    # One writer thread: a shard is written, hashed and fsynced while the model harvests the next one
    # (file I/O and hashing release the GIL), so the harvest runs at about the forward pass's speed.
    # At most one shard waits to be written, so memory holds two shards at most.
    pending: Future[None] | None = None
    index = len(manifest["shards"])
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer") as pool:
            while done < wanted:
                rows, position = [], None
                for batch in contexts:
                    rows.append(batch.tokens[0])
                    position = batch.position
                    if len(rows) == min(shard_contexts, wanted - done):
                        break
                if not rows or position is None:  # no context came (each sets the position)
                    manifest["source_exhausted"] = True
                    log.warning("the text source ran out after %d tokens (of %d asked): the store holds them all",
                                done * T, wanted * T)
                    break
                x, y = harvester.harvest(torch.stack(rows))  # each [len(rows) * T, L, d] in the store dtype
                if pending is not None:
                    pending.result()  # a failed write stops the harvest here, with its own message
                done += len(rows)
                pending = pool.submit(writer.write_shard, index, x, y, len(rows), position, done >= wanted)
                index += 1
            if pending is not None:
                pending.result()
        if manifest["source_exhausted"]:
            manifest["complete"] = True
            writer.write_manifest()
    finally:
        if writer.bar is not None:
            writer.bar.close()


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
