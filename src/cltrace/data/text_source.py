"""The base of every text source: a re-iterable, lazy stream of documents that is never silently empty.

It sits below both `cltrace.data.sources` (files, Hugging Face datasets, spec strings) and
`cltrace.data.default_corpus` (the offline corpus), so that neither imports the other to share it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

from cltrace.errors import CltraceError


class TextSource(ABC):
    """A re-iterable stream of documents.

    Subclasses implement :meth:`_documents`; iteration drops empty/whitespace-only documents and
    raises ``CltraceError`` when a full pass yields no text at all (never a silent empty stream).
    """

    @abstractmethod
    def _documents(self) -> Iterator[str]:
        """Yield raw documents in a fixed order (may include empty ones)."""

    @abstractmethod
    def describe(self) -> str:
        """A short human-readable name for messages and run configs."""

    def __iter__(self) -> Iterator[str]:
        n = 0
        for doc in self._documents():
            if doc and not doc.isspace():
                n += 1
                yield doc
        if n == 0:
            raise CltraceError(
                f"text source {self.describe()} holds no text; give a source with at least one "
                "non-empty document"
            )


__all__ = ["TextSource"]
