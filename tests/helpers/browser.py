"""What the browser tests share: Debian's Chromium (Playwright drives it), where they leave their
screenshots, and the marks that skip them, saying why, where it or the explorer's front end is missing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cltrace.serve.app import BUILD_HINT, assets_built

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS_ROOT = Path(__file__).resolve().parents[2] / "test-artifacts"
NEEDS_CHROMIUM = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed: run `make setup`")
#: The marks of a test of the explorer in the browser.
NEEDS_EXPLORER = [NEEDS_CHROMIUM, pytest.mark.skipif(not assets_built(), reason=BUILD_HINT)]
