"""Plain text out of the default corpus's files: reST, Markdown, POD, AsciiDoc, HTML and Wikipedia extracts."""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import ClassVar


def _split_long(text: str, max_chars: int) -> Iterator[str]:
    """Cut ``text`` into pieces of at most about ``max_chars`` at blank lines."""
    if len(text) <= max_chars:
        yield text
        return
    piece: list[str] = []
    size = 0
    for para in re.split(r"\n\s*\n", text):
        if piece and size + len(para) > max_chars:
            yield "\n\n".join(piece)
            piece, size = [], 0
        piece.append(para)
        size += len(para) + 2
    if piece:
        yield "\n\n".join(piece)


_wiki_cache: dict[Path, list[str]] = {}


def _load_wiki(path: Path) -> list[str]:
    # {title: {"title": ..., "extract": ...}} -> list of extracts in title order
    if path not in _wiki_cache:
        data = json.loads(path.read_text(encoding="utf-8"))
        _wiki_cache[path] = [
            str(v.get("extract", "")) if isinstance(v, dict) else str(v)
            for _, v in sorted(data.items())
        ]
    return _wiki_cache[path]


# Lines made of one repeated punctuation character: rst/asciidoc heading underlines and rules.
_RULE = re.compile(r"^\s*([=\-~^\"'`#*+_.:])\1{2,}\s*$")


def _drop_rules(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not _RULE.match(line))


def _read_plain(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _read_rst(path: Path) -> str:
    return _drop_rules(_read_plain(path))


def _read_markdown_gz(path: Path) -> str:
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as fh:
        return fh.read()


def _read_pod(path: Path) -> str:
    # keep the prose, drop POD's structural commands (=head1 keeps its heading text)
    out = []
    for line in _read_plain(path).splitlines():
        if line.startswith("="):
            cmd, _, rest = line.partition(" ")
            if cmd.startswith("=head") or cmd == "=item":
                out.append(rest)
            continue
        out.append(line)
    return "\n".join(out)


class _HTMLText(HTMLParser):
    """Visible text of an HTML page, leaving out scripts, styles and navigation blocks."""

    _SKIP_TAGS: ClassVar[frozenset[str]] = frozenset({"script", "style", "head", "nav", "footer"})
    _SKIP_CLASS = re.compile(
        r"nav|sidebar|related|footer|header|breadcrumb|toc|headerlink|copiable"
    )
    # fmt: off
    _BLOCK: ClassVar[frozenset[str]] = frozenset({
        "p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "dt", "dd",
        "table", "section", "blockquote", "ul", "ol", "dl",
    })
    # fmt: on
    _VOID: ClassVar[frozenset[str]] = frozenset(
        ["br", "img", "hr", "meta", "link", "input", "col", "area", "base", "wbr", "source"]
    )

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._stack: list[tuple[str, bool]] = []  # open elements: (tag, starts a skipped region)
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._BLOCK:
            self.parts.append("\n")
        if tag in self._VOID:
            return
        cls = " ".join(v or "" for k, v in attrs if k in ("class", "role", "id"))
        skip = tag in self._SKIP_TAGS or bool(cls and self._SKIP_CLASS.search(cls))
        self._stack.append((tag, skip))
        self._skip += skip

    def handle_endtag(self, tag: str) -> None:
        # pop up to the matching open tag: HTML leaves some tags (p, li) unclosed
        if tag in self._VOID or all(t != tag for t, _ in self._stack):
            return
        while self._stack:
            open_tag, skip = self._stack.pop()
            self._skip -= skip
            if open_tag == tag:
                break
        if tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def _read_html(path: Path) -> str:
    parser = _HTMLText()
    parser.feed(_read_plain(path))
    parser.close()
    text = "".join(parser.parts)
    # collapse runs of blank lines and trailing spaces left by the markup
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text)


READERS: dict[str, Callable[[Path], str]] = {
    "rst": _read_rst,
    "markdown-gz": _read_markdown_gz,
    "pod": _read_pod,
    "asciidoc": _read_rst,
    "html": _read_html,
}
