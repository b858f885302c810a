"""The feature store's SQLite layer: its schema, connections, meta keys, transactions and seals.

The tables and the seal are described in `cltrace.features.store`, which reads what this writes.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from cltrace.fingerprint import json_digest, sha256_hex

SCHEMA_VERSION = 1

#: ``PRAGMA application_id`` of a sealed store (ASCII "cltF"); 0 in a store built before sealing.
APPLICATION_ID = 0x636C7446
#: Meta keys a reader relies on, covered by the seal (others, like build timings, may change later).
SEALED_META_KEYS = (
    "schema_version", "transcoder", "fingerprint", "model", "params", "tokens", "contexts", "status",
    "vocab_size", "finalized_tokens",
)
#: Sealed tables: (columns other than the blob, the blob column or None, the order of the rows).
SEALED_TABLES: dict[str, tuple[str, str | None, str]] = {
    "vocab": ("token_id, text", None, "token_id"),
    "contexts": ("ctx_id", "tokens", "ctx_id"),
    "features": (
        "layer, feature, count, density, max_act, mean_act, hist, promoted, suppressed, inputs, auto_label",
        None, "layer, feature",
    ),
    "labels": ("layer, feature, label, updated", None, "layer, feature"),
}
#: Tables a store may lack (they came after stores of this schema version were first written): made
#: when first written to, and sealed like the others where present.
OPTIONAL_TABLES: dict[str, tuple[str, str | None, str]] = {
    "auto_labels": (
        "layer, feature, input_label, input_score, input_evidence, output_label, output_score, output_tokens, "
        "output_evidence, updated", None, "layer, feature",
    ),
    "label_contexts": ("ctx_id", "tokens", "ctx_id"),
}
EXAMPLE_COLUMNS = "layer, feature, kind, rank, ctx_id, pos, act, acts"
#: What to do about a damaged store.
REBUILD = "rebuild it with `cltrace features build ... --overwrite`"
#: The table of per-feature digests (also created by `seal_store` in a store made before it existed).
EXAMPLE_SEALS_TABLE = """CREATE TABLE IF NOT EXISTS example_seals (
    layer INTEGER NOT NULL, feature INTEGER NOT NULL, sha256 TEXT NOT NULL,
    PRIMARY KEY (layer, feature)
) WITHOUT ROWID"""
#: Measured labels (see `cltrace.features.labels`), one row per labelled feature; JSON evidence.
AUTO_LABELS_TABLE = """CREATE TABLE IF NOT EXISTS auto_labels (
    layer INTEGER NOT NULL, feature INTEGER NOT NULL,
    input_label TEXT NOT NULL, input_score REAL, input_evidence TEXT NOT NULL,
    output_label TEXT NOT NULL, output_score REAL, output_tokens TEXT NOT NULL, output_evidence TEXT NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (layer, feature)
) WITHOUT ROWID"""
#: The held-out contexts the measured labels were scored on (token ids, BOS first, int32).
LABEL_CONTEXTS_TABLE = "CREATE TABLE IF NOT EXISTS label_contexts (ctx_id INTEGER PRIMARY KEY, tokens BLOB NOT NULL)"

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS vocab (token_id INTEGER PRIMARY KEY, text TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS contexts (ctx_id INTEGER PRIMARY KEY, tokens BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS state (name TEXT PRIMARY KEY, dtype TEXT NOT NULL, shape TEXT NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS features (
    layer INTEGER NOT NULL, feature INTEGER NOT NULL,
    count INTEGER NOT NULL, density REAL NOT NULL, max_act REAL NOT NULL, mean_act REAL NOT NULL,
    hist TEXT NOT NULL, promoted TEXT NOT NULL, suppressed TEXT NOT NULL, inputs TEXT NOT NULL,
    auto_label TEXT NOT NULL,
    PRIMARY KEY (layer, feature)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS examples (
    layer INTEGER NOT NULL, feature INTEGER NOT NULL, kind TEXT NOT NULL, rank INTEGER NOT NULL,
    ctx_id INTEGER NOT NULL, pos INTEGER NOT NULL, act REAL NOT NULL, acts BLOB NOT NULL,
    PRIMARY KEY (layer, feature, kind, rank)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS labels (
    layer INTEGER NOT NULL, feature INTEGER NOT NULL, label TEXT NOT NULL, updated REAL NOT NULL,
    PRIMARY KEY (layer, feature)
) WITHOUT ROWID;
{EXAMPLE_SEALS_TABLE};
{AUTO_LABELS_TABLE};
{LABEL_CONTEXTS_TABLE};
CREATE INDEX IF NOT EXISTS features_auto_label ON features (auto_label);
"""


def connect(path: str | Path, wal: bool = True) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit) with full durability of commits;
    `wal` switches the file to WAL mode (the builder does; the mode then stays with the file)."""
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    if wal:
        conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


def read_meta(conn: sqlite3.Connection) -> dict[str, Any]:
    """Every meta key with its JSON-decoded value."""
    return {k: json.loads(v) for k, v in conn.execute("SELECT key, value FROM meta")}


def write_meta(conn: sqlite3.Connection, values: dict[str, Any]) -> None:
    """Set meta keys (JSON-encoded values), inside the caller's transaction."""
    conn.executemany(
        "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", [(k, json.dumps(v)) for k, v in values.items()]
    )


# -- seals -----------------------------------------------------------------------------------------


def _rows_digest(rows: list[tuple], blob: bool) -> str | None:
    """sha256 of rows as read from SQLite (the last value of each a blob when `blob`); None when a
    value has a type the table never holds (a damaged record)."""
    if not blob:
        return sha256_hex(repr(rows))
    blobs = [r[-1] for r in rows]
    if not all(isinstance(b, bytes) for b in blobs):
        return None
    # repr: exact for int, float and str
    return sha256_hex([repr([r[:-1] for r in rows]), repr([len(b) for b in blobs]), b"".join(blobs)])


def has_table(conn: sqlite3.Connection, table: str) -> bool:
    """Whether the database holds table `table`."""
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (table,)).fetchone() is not None


def _table_digest(conn: sqlite3.Connection, table: str) -> str | None:
    cols, blob, order = {**SEALED_TABLES, **OPTIONAL_TABLES}[table]
    select = cols + (f", {blob}" if blob else "")
    return _rows_digest(conn.execute(f"SELECT {select} FROM {table} ORDER BY {order}").fetchall(), blob is not None)


def _meta_digest(meta: dict[str, Any]) -> str:
    body = {k: meta.get(k) for k in SEALED_META_KEYS}
    return json_digest(body)


def _feature_examples(conn: sqlite3.Connection, layer: int, feature: int) -> list[tuple]:
    """The examples rows of one feature, in the order the seal and the page read them."""
    return conn.execute(
        f"SELECT {EXAMPLE_COLUMNS} FROM examples WHERE layer=? AND feature=? ORDER BY kind, rank", (layer, feature)
    ).fetchall()


def seal_store(conn: sqlite3.Connection) -> None:
    """Record the digests that let readers detect damage (see the module docstring).

    Call inside the transaction that finishes a build, after its last write to the sealed meta keys
    and tables; `FeatureStore.set_label` keeps the labels digest current.
    """
    conn.execute(EXAMPLE_SEALS_TABLE)
    conn.execute("DELETE FROM example_seals")
    groups: dict[tuple[int, int], list[tuple]] = {
        (int(l), int(f)): [] for l, f in conn.execute("SELECT layer, feature FROM features")
    }
    for row in conn.execute(f"SELECT {EXAMPLE_COLUMNS} FROM examples ORDER BY layer, feature, kind, rank"):
        groups.setdefault((row[0], row[1]), []).append(row)
    conn.executemany(
        "INSERT INTO example_seals (layer, feature, sha256) VALUES (?, ?, ?)",
        [(l, f, _rows_digest(rows, True)) for (l, f), rows in groups.items()],
    )
    seal = {"version": 1, "meta": _meta_digest(read_meta(conn))}
    seal |= {table: _table_digest(conn, table) for table in SEALED_TABLES}
    seal |= {table: _table_digest(conn, table) for table in OPTIONAL_TABLES if has_table(conn, table)}
    write_meta(conn, {"seal": seal})
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")


def reseal(conn: sqlite3.Connection, tables: tuple[str, ...]) -> None:
    """Bring a sealed store's digests of `tables` up to date after writing them (inside the
    caller's transaction); an unsealed store stays unsealed."""
    seal = read_meta(conn).get("seal")
    if isinstance(seal, dict):
        write_meta(conn, {"seal": {**seal, **{t: _table_digest(conn, t) for t in tables}}})


class _transaction:
    """BEGIN IMMEDIATE … COMMIT, rolled back on any exception."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.conn.execute("COMMIT")
        else:
            self.conn.execute("ROLLBACK")


transaction = _transaction


__all__ = [
    "APPLICATION_ID", "AUTO_LABELS_TABLE", "EXAMPLE_COLUMNS", "LABEL_CONTEXTS_TABLE", "OPTIONAL_TABLES", "REBUILD",
    "SCHEMA", "SCHEMA_VERSION", "connect", "has_table", "read_meta", "reseal", "seal_store", "transaction", "write_meta",
]
