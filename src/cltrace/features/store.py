"""The feature store: one SQLite file per transcoder, holding what a researcher needs to read each feature.

Schema (version :data:`SCHEMA_VERSION`):

``meta(key, value)``
    JSON values: ``schema_version``, ``transcoder`` (its config), ``fingerprint`` (sha256 of its
    weights), ``model``, ``params`` (the build settings that must stay fixed across resumes),
    ``tokens`` (tokens analysed, BOS positions not counted), ``contexts``, ``position`` (the
    data position to resume from), ``status`` ("building" or "complete"), ``vocab_size``.
``vocab(token_id, text)``
    The tokenizer's text of every token, so that pages are shown without loading the model.
``contexts(ctx_id, tokens)``
    Every context analysed, its token ids (BOS first) as an int32 blob.
``state(name, dtype, shape, data)``
    The builder's running tensors (top-k heaps, reservoirs, counts, histograms) as raw blobs, so
    that a build resumes or extends exactly where it stopped.
``features(layer, feature, ...)``
    One row per feature: count, density, max and mean activation, histogram, promoted and
    suppressed tokens, input tokens, automatic label.
``examples(layer, feature, kind, rank, ...)``
    The contexts shown on a page: ``kind`` is "top" (rank 0 the highest) or "q{band}" (a uniform
    sample of the feature's activations, cut into activation quantile bands; band 0 the lowest).
``labels(layer, feature, label, updated)``
    Labels a person wrote; kept apart so a rebuild never overwrites them.
``example_seals(layer, feature, sha256)``
    The digest of each feature's ``examples`` rows (see below).
``auto_labels(layer, feature, input_label, input_score, ..., output_evidence, updated)``
    Labels measured from evidence (`cltrace.features.labels`), with their scores and evidence as
    JSON; ``label_contexts(ctx_id, tokens)`` the held-out contexts they were scored on. Stores made
    before these tables read without them; a rebuild or extension empties them.

Every write goes through one SQLite transaction in WAL mode, so a killed process leaves the
database as it was at the last commit.

Damage. SQLite checks its own structure but keeps no checksum of what rows hold, so a flipped bit
in an activation or a token's text would read as a different page. A finished build therefore
seals the store (:func:`seal_store`): the meta key ``seal`` records sha256 digests of the meta
keys readers use and of the ``vocab``, ``contexts``, ``features`` and ``labels`` tables (and of
``auto_labels`` and ``label_contexts`` where the store has them),
``example_seals`` one digest per feature, and ``PRAGMA application_id`` is set to
:data:`APPLICATION_ID`. Opening a store runs ``PRAGMA quick_check`` (the b-tree structure) and,
for a sealed complete store, checks the table digests, once per process while the file is unchanged,
so a server pays it once. :meth:`FeatureStore.page` checks the feature's ``example_seals`` digest. The two
marks of a seal (the meta key and the application id) sit in different places, so no single
damaged byte makes a sealed store read as an unsealed one. Stores built before sealing existed
read as before, checked structurally only. A store in the middle of a build (status "building")
is not content-checked: its digests are being rewritten.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from cltrace.errors import CltraceError, first_line, is_int
from cltrace.features.database import (
    APPLICATION_ID,
    OPTIONAL_TABLES,
    REBUILD,
    SCHEMA_VERSION,
    SEALED_TABLES,
    _feature_examples,
    _meta_digest,
    _rows_digest,
    _table_digest,
    connect,
    has_table,
    read_meta,
    seal_store,
    transaction,
    write_meta,
)
from cltrace.features.labels import FeatureLabel, LabelConfig, label_rows, labels_for, measured_page
from cltrace.features.page import Example, FeaturePage, Labeller, TokenLabeller, TokenScore

#: Stores checked in this process (quick_check and, if sealed, the digests), by `_identity`.
_VERIFIED: dict[tuple, bool] = {}


def _identity(path: Path) -> tuple:
    """What changes when the store's bytes change: the file's device, inode, size and times, and
    the size and time of its WAL when that holds anything (an empty one comes and goes with every
    connection, so it is left out)."""
    st = os.stat(path)
    try:
        wal = os.stat(f"{path}-wal")
        wal_id = (wal.st_size, wal.st_mtime_ns) if wal.st_size else None
    except OSError:
        wal_id = None
    return str(path.resolve()), (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns), wal_id


# -- the store -------------------------------------------------------------------------------------


def _blob_floats(blob: bytes, dtype: str = "<f2") -> list[float]:
    return np.frombuffer(blob, dtype=dtype).astype(np.float64).tolist()


class FeatureStore:
    """Read (and label) a feature store built by :func:`cltrace.features.build_feature_store`.

    >>> store = FeatureStore("features.db")
    >>> page = store.page(3, 117)
    >>> store.set_label(3, 117, "acronym: say the next capital letter")
    """

    def __init__(self, path: str | os.PathLike[str], verify: bool = True) -> None:
        """Open the store at `path`; CltraceError (one line) if it is missing, foreign or damaged.

        `verify` (default) runs SQLite's quick_check and checks a sealed, complete store's digests
        (see the module docstring), once per process for an unchanged file.
        """
        self.path = Path(path)
        if not self.path.is_file():
            raise CltraceError(f"feature store '{path}' does not exist: build it with `cltrace features build`")
        self._conn: sqlite3.Connection | None = None
        key = _identity(self.path)
        checked = not verify or _VERIFIED.get(key, False)
        try:
            self._conn = connect(self.path, wal=False)
            bad = ["ok"] if checked else [str(r[0]) for r in self.conn.execute("PRAGMA quick_check(3)")]
            if bad != ["ok"]:
                said = " ".join("; ".join(bad).split())[:200]  # its report spans lines
                raise CltraceError(f"feature store '{path}' is damaged (SQLite's quick_check: {said}); {REBUILD}")
            app_id = self.conn.execute("PRAGMA application_id").fetchone()[0]
            self.meta = read_meta(self.conn)
        except CltraceError:
            self.close()
            raise
        except (sqlite3.Error, ValueError, RecursionError) as exc:  # ValueError: unreadable meta JSON
            self.close()
            raise CltraceError(
                f"'{path}' is not a feature store, or is damaged ({first_line(exc)}): pass a database built by "
                f"`cltrace features build`, or {REBUILD}"
            ) from None
        try:
            self._check_meta(app_id, verify, checked)
        except BaseException:
            self.close()
            raise
        if not checked and _identity(self.path) == key:  # unchanged while it was checked
            if len(_VERIFIED) > 64:
                _VERIFIED.clear()
            _VERIFIED[key] = True
        self._vocab: dict[int, str] = {}

    def _damaged(self, what: str) -> CltraceError:
        return CltraceError(f"feature store '{self.path}' is damaged ({what}); {REBUILD}")

    def _check_meta(self, app_id: int, verify: bool, checked: bool) -> None:
        """Refuse a foreign, newer or damaged store; check a sealed store's digests unless `checked`."""
        meta, path = self.meta, self.path
        version = meta.get("schema_version")
        if version is None:
            raise CltraceError(f"'{path}' is not a feature store (no schema version): build one with `cltrace features build`")
        if version != SCHEMA_VERSION:
            raise CltraceError(
                f"feature store '{path}' has schema version {version!r}; this cltrace reads version {SCHEMA_VERSION}: rebuild it"
            )
        seal = meta.get("seal")
        if app_id not in (0, APPLICATION_ID):
            raise self._damaged(f"its SQLite header holds application id {app_id}, not cltrace's")
        if (app_id == APPLICATION_ID) != (seal is not None):
            raise self._damaged("only one of its two seal marks is present")
        cfg, params = meta.get("transcoder"), meta.get("params")
        ok = (
            isinstance(cfg, dict) and all(is_int(cfg.get(k)) and cfg[k] >= 1 for k in ("n_layers", "n_features"))
            and isinstance(params, dict) and all(is_int(params.get(k)) and params[k] >= 0 for k in ("window_before", "window_after"))
            and isinstance(params.get("hist_edges"), list) and meta.get("status") in ("building", "complete")
            and is_int(meta.get("tokens", 0)) and is_int(meta.get("contexts", 0))
        )
        if not ok or not isinstance(cfg, dict):
            raise self._damaged("its meta table holds malformed values")
        self.n_layers, self.n_features = int(cfg["n_layers"]), int(cfg["n_features"])
        # Pages are checked against the seal only when it is current: not while a build rewrites it.
        self._sealed = seal is not None and meta["status"] == "complete" and verify
        if not self._sealed:
            return
        if not isinstance(seal, dict) or any(not isinstance(seal.get(k), str) for k in ("meta", *SEALED_TABLES)):
            raise self._damaged("its seal is malformed")
        if checked:
            return
        if seal["meta"] != _meta_digest(meta):
            raise self._damaged("its meta table does not match its seal")
        try:
            for table in SEALED_TABLES:
                if seal[table] != _table_digest(self.conn, table):
                    raise self._damaged(f"its {table} table does not match its seal")
            self._check_optional_tables(seal)
        except sqlite3.Error as exc:
            raise self._damaged(first_line(exc)) from None

    def _check_optional_tables(self, seal: dict[str, Any]) -> None:
        """The tables a store may lack (measured labels): sealed where present, unless empty."""
        for table in OPTIONAL_TABLES:
            if not has_table(self.conn, table):
                continue
            if table in seal:
                if seal[table] != _table_digest(self.conn, table):
                    raise self._damaged(f"its {table} table does not match its seal")
            elif self.conn.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is not None:
                raise self._damaged(f"its {table} table is not covered by its seal")

    @property
    def conn(self) -> sqlite3.Connection:
        """The open database connection."""
        if self._conn is None:
            raise CltraceError(f"feature store '{self.path}' could not be opened: open it again with FeatureStore(path)")
        return self._conn

    def close(self) -> None:
        """Close the database connection."""
        if self._conn is not None:
            self._conn.close()

    def __enter__(self) -> FeatureStore:  # noqa: PYI034 - Self needs Python 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- lookups -----------------------------------------------------------------------------------

    def _check_feature(self, layer: int, feature: int) -> None:
        if not 0 <= layer < self.n_layers:
            raise CltraceError(f"unknown feature {layer}:{feature}: layer must be in [0, {self.n_layers})")
        if not 0 <= feature < self.n_features:
            raise CltraceError(f"unknown feature {layer}:{feature}: feature must be in [0, {self.n_features})")

    def texts(self, token_ids: Iterable[int]) -> dict[int, str]:
        """The text of each token id (cached)."""
        missing = sorted({int(t) for t in token_ids} - self._vocab.keys())
        try:
            for start in range(0, len(missing), 900):
                chunk = missing[start : start + 900]
                q = ",".join("?" * len(chunk))
                for tid, text in self.conn.execute(f"SELECT token_id, text FROM vocab WHERE token_id IN ({q})", chunk):
                    self._vocab[tid] = text
                for tid in chunk:
                    self._vocab.setdefault(tid, f"<{tid}>")
        except sqlite3.Error as exc:
            raise self._damaged(first_line(exc)) from None
        return self._vocab

    def page(self, layer: int, feature: int) -> FeaturePage:
        """The page of feature `layer:feature`; CltraceError if the store does not have it or is damaged."""
        self._check_feature(layer, feature)
        try:
            return self._page(layer, feature)
        except CltraceError:
            raise
        except sqlite3.Error as exc:
            raise self._damaged(first_line(exc)) from None
        except (ValueError, TypeError, KeyError, IndexError, RecursionError) as exc:
            # Rows that do not decode (bad JSON, blobs of the wrong length, missing contexts): only a
            # damaged or foreign database holds them; a sealed one is caught by its digests first.
            raise self._damaged(f"feature {layer}:{feature} does not decode: {type(exc).__name__}") from None

    def _page(self, layer: int, feature: int) -> FeaturePage:
        row = self.conn.execute(
            "SELECT count, density, max_act, mean_act, hist, promoted, suppressed, inputs, auto_label "
            "FROM features WHERE layer=? AND feature=?",
            (layer, feature),
        ).fetchone()
        if row is None:
            status = self.meta.get("status")
            raise CltraceError(
                f"feature {layer}:{feature} is not in '{self.path}'"
                + (" (its build has not finished: run `cltrace features build` again to complete it)" if status != "complete" else "")
            )
        count, density, max_act, mean_act, hist, promoted, suppressed, inputs, auto_label = row
        label_row = self.conn.execute("SELECT label FROM labels WHERE layer=? AND feature=?", (layer, feature)).fetchone()
        full_rows = _feature_examples(self.conn, layer, feature)
        if self._sealed:
            sealed = self.conn.execute(
                "SELECT sha256 FROM example_seals WHERE layer=? AND feature=?", (layer, feature)
            ).fetchone()
            if sealed is None or sealed[0] != _rows_digest(full_rows, True):
                raise self._damaged(f"the examples of feature {layer}:{feature} do not match their seal")
        ex_rows = [r[2:] for r in full_rows]  # kind, rank, ctx_id, pos, act, acts
        ctx_ids = sorted({r[2] for r in ex_rows})
        ctx_tokens: dict[int, np.ndarray] = {}
        if ctx_ids:
            q = ",".join("?" * len(ctx_ids))
            for cid, blob in self.conn.execute(f"SELECT ctx_id, tokens FROM contexts WHERE ctx_id IN ({q})", ctx_ids):
                ctx_tokens[cid] = np.frombuffer(blob, dtype="<i4")
        params = self.meta["params"]
        before, after = int(params["window_before"]), int(params["window_after"])
        windows = []
        for kind, rank, cid, pos, act, acts_blob in ex_rows:
            toks = ctx_tokens[cid]
            acts = _blob_floats(acts_blob)
            lo, hi = max(1, pos - before), min(len(toks) - 1, pos + after)
            windows.append((kind, rank, cid, pos, act, toks[lo : hi + 1].tolist(), acts[lo - (pos - before) : hi + 1 - (pos - before)], pos - lo))
        hist_data = json.loads(hist)
        promoted_l, suppressed_l, inputs_l = json.loads(promoted), json.loads(suppressed), json.loads(inputs)
        vocab = self.texts(
            [t for w in windows for t in w[5]] + [t for t, _ in promoted_l] + [t for t, _ in suppressed_l] + [t for t, _ in inputs_l]
        )
        top: list[Example] = []
        samples: list[Example] = []
        for kind, _rank, cid, pos, act, toks, acts, mark in windows:
            ex = Example(cid, pos, act, toks, [vocab[t] for t in toks], acts, mark, None if kind == "top" else int(kind[1:]))
            (top if kind == "top" else samples).append(ex)
        samples.sort(key=lambda e: (e.band, e.act))
        return FeaturePage(
            layer=layer,
            feature=feature,
            label=label_row[0] if label_row else None,
            auto_label=auto_label,
            count=count,
            density=density,
            max_act=max_act,
            mean_act=mean_act,
            hist_edges=self.meta["params"]["hist_edges"],
            hist_counts=hist_data,
            promoted=[TokenScore(t, vocab[t], s) for t, s in promoted_l],
            suppressed=[TokenScore(t, vocab[t], s) for t, s in suppressed_l],
            inputs=[TokenScore(t, vocab[t], s) for t, s in inputs_l],
            top=top,
            samples=samples,
            tokens_analysed=int(self.meta.get("tokens", 0)),
            measured=measured_page(self, layer, feature),
        )

    # -- labels ------------------------------------------------------------------------------------

    def set_label(self, layer: int, feature: int, label: str | None) -> None:
        """Set a feature's label (None or "" removes it); kept across rebuilds and extensions."""
        self._check_feature(layer, feature)
        try:
            self._set_label(layer, feature, label)
        except sqlite3.Error as exc:
            raise self._damaged(first_line(exc)) from None

    def _set_label(self, layer: int, feature: int, label: str | None) -> None:
        with transaction(self.conn):
            if label:
                self.conn.execute(
                    "INSERT OR REPLACE INTO labels (layer, feature, label, updated) VALUES (?, ?, ?, ?)",
                    (layer, feature, label, time.time()),
                )
            else:
                self.conn.execute("DELETE FROM labels WHERE layer=? AND feature=?", (layer, feature))
            seal = read_meta(self.conn).get("seal")
            if isinstance(seal, dict):  # keep a sealed store's labels digest current
                write_meta(self.conn, {"seal": {**seal, "labels": _table_digest(self.conn, "labels")}})

    def labels_for(
        self, keys: Iterable[tuple[int, int]], config: LabelConfig | None = None
    ) -> dict[tuple[int, int], FeatureLabel]:
        """The label of each feature of `keys`: a person's, else the measured one (see
        `cltrace.features.labels`), else the token-list automatic label, marked unclear."""
        try:
            return labels_for(self, keys, config)
        except sqlite3.Error as exc:
            raise self._damaged(first_line(exc)) from None
        except (ValueError, TypeError) as exc:
            raise self._damaged(f"its measured labels do not decode: {type(exc).__name__}") from None

    def labels(self) -> dict[tuple[int, int], str]:
        """Every label a person set."""
        try:
            return {(l, f): s for l, f, s in self.conn.execute("SELECT layer, feature, label FROM labels")}
        except sqlite3.Error as exc:
            raise self._damaged(first_line(exc)) from None

    def search(self, text: str, limit: int = 50) -> list[tuple[int, int, str]]:
        """Features whose label (or, without one, automatic label) contains `text` (case-insensitive):
        (layer, feature, label), by layer then feature."""
        pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        try:
            return self._search(pattern, limit)
        except sqlite3.Error as exc:
            raise self._damaged(first_line(exc)) from None
        except (ValueError, TypeError) as exc:
            raise self._damaged(f"its measured labels do not decode: {type(exc).__name__}") from None

    def _search(self, pattern: str, limit: int) -> list[tuple[int, int, str]]:
        # a measured label is searched by its parts and shown as its display text
        found = label_rows(
            self, "WHERE COALESCE(l.label, NULLIF(TRIM(a.input_label || ' ' || a.output_label), ''), f.auto_label) "
            "LIKE ? ESCAPE '\\' ORDER BY f.layer, f.feature LIMIT ?", (pattern, limit),
        )
        return [(label.layer, label.feature, label.text()) for label in found]

    def stats(self) -> dict[str, Any]:
        """Summary: model, transcoder, tokens analysed, build status, dead/alive features, mean density."""
        try:
            return self._stats()
        except sqlite3.Error as exc:
            raise self._damaged(first_line(exc)) from None
        except (ValueError, TypeError, KeyError) as exc:
            raise self._damaged(f"its summary does not decode: {type(exc).__name__}") from None

    def _stats(self) -> dict[str, Any]:
        row = self.conn.execute(
            "SELECT COUNT(*), SUM(count > 0), AVG(density), MAX(max_act) FROM features"
        ).fetchone()
        n_rows, alive, mean_density, max_act = row
        cfg = self.meta["transcoder"]
        return {
            "path": str(self.path),
            "schema_version": self.meta["schema_version"],
            "model": self.meta.get("model"),
            "transcoder": f"{cfg['kind']} {cfg['n_layers']}x{cfg['n_features']}",
            "fingerprint": self.meta.get("fingerprint"),
            "status": self.meta.get("status"),
            "tokens": int(self.meta.get("tokens", 0)),
            "contexts": int(self.meta.get("contexts", 0)),
            "features": int(n_rows or 0),
            "alive": int(alive or 0),
            "dead": int((n_rows or 0) - (alive or 0)),
            "mean_density": float(mean_density or 0.0),
            "max_act": float(max_act or 0.0),
            "labels": int(self.conn.execute("SELECT COUNT(*) FROM labels").fetchone()[0]),
            "bytes": self.path.stat().st_size,
        }


__all__ = [
    "SCHEMA_VERSION",
    "Example",
    "FeaturePage",
    "FeatureStore",
    "Labeller",
    "TokenLabeller",
    "TokenScore",
    "connect",
    "seal_store",
]
