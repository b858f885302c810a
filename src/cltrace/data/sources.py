"""Text sources: where training text comes from.

Every source is a re-iterable object: each ``iter(source)`` starts a fresh, lazy pass that yields
documents (``str``) in a fixed order, so a packer can re-read a source to resume where it stopped.
Nothing is read until iteration starts, and a source that turns out to hold no text at all raises
:class:`~cltrace.errors.CltraceError` at the end of its first pass instead of yielding nothing.

Sources:

* :class:`HFDatasetSource` - a Hugging Face dataset, streamed (needs ``datasets``, imported lazily).
* :class:`FileSource` - a ``.txt``, ``.jsonl`` or ``.parquet`` file, or a folder of them.
* :class:`~cltrace.data.default_corpus.DefaultCorpusSource` - the offline default corpus
  (see ``docs/corpus.md``).

:func:`open_text_source` turns a spec string (a path, ``"default"`` or ``"hf:NAME[:CONFIG][:SPLIT]"``)
into one of these.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from cltrace.data.default_corpus import DefaultCorpusSource
from cltrace.data.text_source import TextSource
from cltrace.errors import CltraceError, first_line

#: File suffixes a :class:`FileSource` reads; anything else is an unsupported file type.
SUPPORTED_SUFFIXES: tuple[str, ...] = (".txt", ".jsonl", ".parquet")

TxtSplit = Literal["file", "paragraph"]


class HFDatasetSource(TextSource):
    """A Hugging Face dataset streamed with ``datasets.load_dataset(..., streaming=True)``.

    Needs the hub (or a local dataset path) at iteration time; nothing is touched before.
    """

    def __init__(
        self,
        name: str,
        config: str | None = None,
        split: str = "train",
        text_column: str = "text",
    ) -> None:
        if not name:
            raise CltraceError("Hugging Face dataset name is empty; write hf:NAME[:CONFIG][:SPLIT]")
        self.name = name
        self.config = config or None
        self.split = split or "train"
        self.text_column = text_column

    def describe(self) -> str:
        cfg = f":{self.config}" if self.config else ""
        return f"'hf:{self.name}{cfg}:{self.split}'"

    def _documents(self) -> Iterator[str]:
        try:
            import datasets  # lazy: the package imports (and tests run) without it
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise CltraceError(
                "reading a Hugging Face dataset needs the 'datasets' package; "
                "install it with: pip install datasets (make setup does)"
            ) from e
        try:
            ds = datasets.load_dataset(self.name, self.config, split=self.split, streaming=True)
        except Exception as e:  # datasets raises many types; report them as one user error
            raise CltraceError(
                f"could not open Hugging Face dataset {self.describe()}: {type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}; check the name, config and split "
                "and that the hub is reachable"
            ) from e
        checked = False
        for row in ds:
            if not checked:
                _check_column(row.keys(), self.text_column, self.describe())
                checked = True
            text = row[self.text_column]
            if isinstance(text, str):
                yield text


class FileSource(TextSource):
    """Local text files: one ``.txt``/``.jsonl``/``.parquet`` file, or a folder of them.

    A folder is walked recursively in sorted path order (so the document order, and hence the
    held-out split and resume positions, are stable); files with other suffixes in a folder are
    skipped, but a single file with another suffix is an error.

    * ``.txt``: with ``txt_split="file"`` (default) each file is one document; with
      ``"paragraph"`` each block of text separated by one or more blank lines is a document.
    * ``.jsonl``: one JSON object per line, the document is its ``text_column`` field.
    * ``.parquet``: the ``text_column`` column (read in row batches with ``pyarrow``).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        text_column: str = "text",
        txt_split: TxtSplit = "file",
    ) -> None:
        self.path = Path(path)
        self.text_column = text_column
        if txt_split not in ("file", "paragraph"):
            raise CltraceError(f"txt_split must be 'file' or 'paragraph', not {txt_split!r}")
        self.txt_split: TxtSplit = txt_split
        if not self.path.exists():
            raise CltraceError(
                f"no such file or folder: {self.path}; give a .txt, .jsonl or .parquet file, a "
                "folder of them, 'default', or 'hf:NAME[:CONFIG][:SPLIT]'"
            )
        if self.path.is_file() and self.path.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise CltraceError(
                f"unsupported file type '{self.path.suffix or self.path.name}' for {self.path}; "
                f"supported: {', '.join(SUPPORTED_SUFFIXES)}"
            )

    def describe(self) -> str:
        return f"'{self.path}'"

    def files(self) -> list[Path]:
        """The files read, in reading order."""
        if self.path.is_file():
            return [self.path]
        found = [
            p
            for p in self.path.rglob("*")
            if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES and not p.name.startswith(".")
        ]
        if not found:
            raise CltraceError(
                f"folder {self.path} has no .txt, .jsonl or .parquet files; put text files in it "
                "or point at another folder"
            )
        return sorted(found)

    def _documents(self) -> Iterator[str]:
        for f in self.files():
            suffix = f.suffix.lower()
            if suffix == ".txt":
                yield from _read_txt(f, self.txt_split)
            elif suffix == ".jsonl":
                yield from _read_jsonl(f, self.text_column)
            else:
                yield from _read_parquet(f, self.text_column)

def _read_txt(path: Path, split: TxtSplit) -> Iterator[str]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")  # bad bytes become U+FFFD, never an error
    except OSError as e:
        raise CltraceError(f"cannot read {path} ({first_line(e)}); check the file and its permissions") from None
    if split == "file":
        yield text
        return
    block: list[str] = []
    for line in text.splitlines():
        if line.strip():
            block.append(line)
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


def _read_jsonl(path: Path, column: str) -> Iterator[str]:
    try:
        fh = path.open(encoding="utf-8", errors="replace")
    except OSError as e:
        raise CltraceError(f"cannot read {path} ({first_line(e)}); check the file and its permissions") from None
    with fh:
        for lineno, line in enumerate(_lines(fh, path), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError) as e:  # ValueError: bad JSON, or an integer too long to read
                msg = e.msg if isinstance(e, json.JSONDecodeError) else first_line(e)
                raise CltraceError(
                    f"{path}:{lineno} is not valid JSON ({msg}); each line of a .jsonl file "
                    "must be one JSON object"
                ) from None
            if not isinstance(row, dict):
                raise CltraceError(
                    f"{path}:{lineno} is a JSON {type(row).__name__}, not an object; each line "
                    f"must be an object with a '{column}' field"
                )
            if column not in row:
                _check_column(row.keys(), column, f"{path}:{lineno}")
            value = row[column]
            if isinstance(value, str):
                yield value
            elif value is not None:
                raise CltraceError(
                    f"{path}:{lineno} field '{column}' is a {type(value).__name__}, not a string; "
                    "choose a text field with --text-column"
                )


def _lines(fh: Any, path: Path) -> Iterator[str]:
    """The lines of an open text file; a read error becomes a CltraceError naming the file."""
    while True:
        try:
            line = fh.readline()
        except OSError as e:
            raise CltraceError(f"cannot read {path} ({first_line(e)}); check the file and its permissions") from None
        if not line:
            return
        yield line


def _read_parquet(path: Path, column: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq  # lazy: only parquet sources need it
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise CltraceError(
            f"reading {path} needs the 'pyarrow' package; install it with: pip install pyarrow"
        ) from e
    damaged = "it is damaged or not parquet: re-create or re-download it"
    try:
        # Page checksums are checked where the writer recorded them (pyarrow's write_page_checksum).
        pf = pq.ParquetFile(path, page_checksum_verification=True)
        names = pf.schema_arrow.names
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError/... for non-parquet bytes
        raise CltraceError(f"{path} is not a readable parquet file ({first_line(e)}); {damaged}") from None
    _check_column(names, column, str(path))
    batches = pf.iter_batches(columns=[column], batch_size=1024)
    while True:
        try:
            batch = next(batches, None)
            values = None if batch is None else batch.column(0).to_pylist()
        except Exception as e:  # a damaged page: a decompression, decoding or checksum error
            raise CltraceError(f"cannot read {path} ({first_line(e)}); {damaged}") from None
        if values is None:
            return
        for value in values:
            if isinstance(value, str):
                yield value
            elif value is not None:
                raise CltraceError(
                    f"{path} column '{column}' holds {type(value).__name__} values, not strings; "
                    "choose a text column with --text-column"
                )


def _check_column(names: Iterable[object], column: str, where: str) -> None:
    names = list(names)
    if column not in names:
        # quoted where unprintable, and capped: a damaged file's names may hold newlines or be many
        shown = ", ".join(str(n) if str(n).isprintable() else repr(str(n)) for n in names[:20])
        shown += ", ..." if len(names) > 20 else ""
        raise CltraceError(
            f"{where} has no column {column!r}; columns there: {shown or '(none)'}"
            " - pass the right one as text_column (--text-column)"
        )


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """Split ``"hf:NAME[:CONFIG][:SPLIT]"`` into ``(name, config, split)``.

    ``NAME`` may contain ``/`` (``org/name``); an empty ``CONFIG`` (``hf:NAME::SPLIT``) means the
    dataset's default config; ``SPLIT`` defaults to ``"train"``.
    """
    body = spec[len("hf:") :]
    parts = body.split(":")
    if not parts[0] or len(parts) > 3:
        raise CltraceError(
            f"bad Hugging Face spec {spec!r}; write hf:NAME, hf:NAME:CONFIG or hf:NAME:CONFIG:SPLIT "
            "(hf:NAME::SPLIT for the default config)"
        )
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return name, config, split


def open_text_source(
    spec: str,
    text_column: str = "text",
    txt_split: TxtSplit = "file",
    default_roots: list[str | os.PathLike[str]] | None = None,
) -> TextSource:
    """Open the text source named by ``spec``.

    Args:
        spec: ``"default"`` for the offline default corpus; ``"hf:NAME[:CONFIG][:SPLIT]"`` for a
            Hugging Face dataset (streamed); anything else is a path to a ``.txt``, ``.jsonl`` or
            ``.parquet`` file or a folder of them.
        text_column: the field/column holding the text (``.jsonl``, ``.parquet``, hf datasets).
        txt_split: ``"file"`` (one document per ``.txt`` file) or ``"paragraph"`` (one per
            blank-line-separated block).
        default_roots: where to look for the default corpus files (see
            :class:`~cltrace.data.default_corpus.DefaultCorpusSource`).

    Returns:
        A re-iterable :class:`TextSource`; nothing is read until it is iterated.

    Raises:
        CltraceError: empty spec, missing path, unsupported file type, malformed ``hf:`` spec.
    """
    spec = spec.strip()
    if not spec:
        raise CltraceError(
            "text source is empty; give a path, 'default', or 'hf:NAME[:CONFIG][:SPLIT]'"
        )
    if spec == "default":
        return DefaultCorpusSource(roots=default_roots)
    if spec.startswith("hf:"):
        name, config, split = parse_hf_spec(spec)
        return HFDatasetSource(name, config, split, text_column=text_column)
    return FileSource(spec, text_column=text_column, txt_split=txt_split)
