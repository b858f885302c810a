"""``python -m cltrace.data.install_corpus [DEST]``: fetch and unpack the default corpus.

Unpacks the Debian components under DEST (default: the user cache folder that cltrace searches),
with no root and no system changes, then reports where each component was found. Exit status 0
when every component is there, 1 when some are missing, 2 on an error.
"""

from __future__ import annotations

import sys

from cltrace.data.default_corpus import (
    ROOT_ENV,
    DefaultCorpusSource,
    default_install_dir,
    default_roots,
    install_default_corpus,
)
from cltrace.errors import CltraceError


def main(argv: list[str] | None = None) -> int:
    """Install the default corpus and print each component's folder (or MISSING)."""
    args = sys.argv[1:] if argv is None else argv
    try:
        where = install_default_corpus(args[0] if args else None)
        found = DefaultCorpusSource(roots=[where, *default_roots()]).installed()
    except CltraceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, folder in found.items():
        print(f"{name:18s} {folder if folder else 'MISSING'}")
    if args and where != default_install_dir():
        print(f"set {ROOT_ENV}={where} so cltrace finds it")
    return 0 if all(found.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
