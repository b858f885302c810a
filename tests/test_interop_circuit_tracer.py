"""Interop with a real client: a graph exported by `cltrace export --supernodes` opens in
circuit-tracer's own front end, in headless Chromium, with no console error and its supernodes shown.

The front end is the one in the circuit-tracer wheel (the version constraints.txt pins), downloaded
from PyPI without its dependencies (it is read, never installed or imported) into pytest's cache;
where it cannot be downloaded the test is skipped, saying so. Its page loads its libraries from
CDNs; they come from this project's npm packages instead (`web/vendor.mjs`: d3 v7 with d3-jetpack,
dagre, pako). Two CDN scripts have no npm package and are not needed by the graph page, so they are
left out: the authors' dev-server reload client (hotserver-client-ws.js) and a .npy reader used only
by the addition pages (npy_v0.js). Every request off this machine is refused and recorded: none may
be made.

circuit-tracer's page reads the supernodes from its address, not from the file's qParams (an empty
list from the address wins over the file's), so it is opened at the address the qParams make
(`qparams_query`), as Neuronpedia's share links carry them; the file's own qParams hold the same.
"""

from __future__ import annotations

import functools
import http.server
import json
import re
import shutil
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.browser import ARTIFACTS_ROOT, CHROMIUM, NEEDS_CHROMIUM
from helpers.cli import run_cli
from helpers.serve import ACRONYM, replacement

from cltrace.graph.attribution import attribute
from cltrace.graph.export import qparams_query
from cltrace.graph.graph import NodeKind
from cltrace.graph.prune import prune
from cltrace.replacement.supernodes import Supernode, save_supernodes

playwright_api = pytest.importorskip("playwright.sync_api")

REPO = Path(__file__).resolve().parents[1]
WEB = REPO / "web"
ARTIFACTS = ARTIFACTS_ROOT / "interop"
#: CDN scripts of the page and what replaces each (None: left out, see the module docstring).
CDN = {
    "https://transformer-circuits.pub/2025/attribution-graphs/static_js/lib/hotserver-client-ws.js": None,
    "https://transformer-circuits.pub/2025/attribution-graphs/static_js/lib/d3.js": "./vendor/d3.js",
    "https://transformer-circuits.pub/2025/attribution-graphs/static_js/lib/jetpack_2024-07-20.js": None,  # in vendor/d3.js
    "https://transformer-circuits.pub/2025/attribution-graphs/static_js/lib/npy_v0.js": None,
    "https://unpkg.com/dagre@0.8.5/dist/dagre.min.js": "./vendor/dagre.min.js",
    "https://unpkg.com/pako@2.1.0/dist/pako.min.js": "./vendor/pako.min.js",
}

pytestmark = [
    pytest.mark.slow,
    NEEDS_CHROMIUM,
]


def pinned_version() -> str:
    found = re.search(r"^circuit-tracer==(\S+)$", (REPO / "constraints.txt").read_text(), re.M)
    assert found, "constraints.txt pins circuit-tracer"
    return found.group(1)


@pytest.fixture(scope="module")
def frontend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """circuit-tracer's front-end assets, unpacked from its wheel (downloaded once into pytest's cache)."""
    version = pinned_version()
    pytest_cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    name = f"circuit-tracer-{version}"
    cache = Path(pytest_cache.mkdir(name)) if pytest_cache is not None else tmp_path_factory.mktemp(name)
    wheels = sorted(cache.glob(f"circuit_tracer-{version}-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "-c", str(REPO / "constraints.txt"), "-d", str(cache), "circuit-tracer"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        except subprocess.TimeoutExpired:
            pytest.skip(f"circuit-tracer {version} cannot be installed: PyPI did not answer within 3 minutes")
        wheels = sorted(cache.glob(f"circuit_tracer-{version}-*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
            pytest.skip(f"circuit-tracer {version} cannot be installed: `pip download` failed ({last[:200]})")
    out = tmp_path_factory.mktemp("circuit-tracer")
    with zipfile.ZipFile(wheels[-1]) as whl:
        for name in whl.namelist():
            if name.startswith("circuit_tracer/frontend/assets/"):
                whl.extract(name, out)
    return out / "circuit_tracer" / "frontend" / "assets"


def vendor(site: Path) -> None:
    """The page's libraries from this project's npm packages (skip, saying why, where they are missing)."""
    node = shutil.which("node")
    if node is None or not (WEB / "node_modules" / "d3-jetpack").is_dir():
        pytest.skip("node or the web packages are missing: run `make setup` (npm ci installs d3, d3-jetpack, dagre, pako)")
    done = subprocess.run([node, str(WEB / "vendor.mjs"), str(site / "vendor")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def local_page(frontend: Path, site: Path) -> None:
    """`site`: the assets, with the page's CDN scripts replaced (or left out) as CDN says."""
    shutil.copytree(frontend, site)
    page = site / "index.html"
    html = page.read_text(encoding="utf-8")
    for url, local in CDN.items():
        tag = f"<script src='{url}'></script>\n"
        assert tag in html, f"the page no longer loads {url}: update CDN"
        html = html.replace(tag, "" if local is None else f"<script src='{local}'></script>\n")
    assert not re.search(r"""(src|href)=['"]?(https?:)?//""", html), "a script or style still comes from the internet"
    page.write_text(html, encoding="utf-8")
    vendor(site)


@pytest.fixture
def served(frontend: Path, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]) -> Iterator[dict]:
    """circuit-tracer's page and the exported graph, on a local HTTP server laid out as its own
    local server lays them out (graph_data/SLUG.json, data/graph-metadata.json)."""
    work = tmp_path_factory.mktemp("interop")
    site = work / "site"
    local_page(frontend, site)
    graph = attribute(replacement(), ACRONYM, max_feature_nodes=200, batch_size=64, progress=False)
    graph.save(work / "acronym.safetensors")
    pruned, _ = prune(graph)  # what the export keeps: the supernodes' members among it
    ranked = sorted((nid for nid, k in zip(pruned.node_ids(), pruned.nodes.kind.tolist()) if k == NodeKind.FEATURE),
                    key=dict(zip(pruned.node_ids(), pruned.nodes.influence.tolist())).get)
    members = [tuple(int(x) for x in nid.split("_")) for nid in ranked[:5]]
    groups = [Supernode("say-acronym", members[:3]), Supernode("first-letter", members[3:5])]
    save_supernodes(work / "supernodes.json", groups)
    (site / "graph_data").mkdir()
    (site / "data").mkdir()
    code, out, err = run_cli("export", str(work / "acronym.safetensors"), "-o", str(site / "graph_data" / "acronym.json"),
                             "--supernodes", str(work / "supernodes.json"), capsys=capsys)
    assert code == 0 and "2 of 2 supernodes" in out, err
    data = json.loads((site / "graph_data" / "acronym.json").read_text())
    (site / "data" / "graph-metadata.json").write_text(json.dumps({"graphs": [data["metadata"]]}))

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *_args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {"url": f"http://127.0.0.1:{server.server_address[1]}/", "data": data}
    server.shutdown()


def test_circuit_tracer_front_end_shows_the_exported_supernodes(served: dict) -> None:
    data = served["data"]
    groups = data["qParams"]["supernodes"]
    assert [g[0] for g in groups] == ["say-acronym", "first-letter"] and [len(g) - 1 for g in groups] == [3, 2]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        errors: list[str] = []
        outside: list[str] = []
        page.on("console", lambda msg: msg.type == "error" and errors.append(msg.text))
        page.on("pageerror", lambda exc: errors.append(str(exc)))

        def only_local(route: object) -> None:
            if route.request.url.startswith(served["url"]):
                route.continue_()
            else:
                outside.append(route.request.url)
                route.abort()

        page.route("**/*", only_local)
        page.goto(served["url"] + "index.html?" + qparams_query(data))
        page.wait_for_function("document.querySelectorAll('.subgraph .supernode-container .ungroup-btn').length === 2",
                               timeout=30_000)
        shown = page.evaluate(
            "[...document.querySelectorAll('.subgraph .supernode-container')].filter(c => c.querySelector('.ungroup-btn'))"
            ".map(c => ({text: c.textContent, members: c.querySelectorAll('.member-circle').length}))"
        )
        # the link graph drew the exported nodes: one per feature, error, token and output node kept
        drawn = page.evaluate("document.querySelectorAll('.link-graph .node').length")
        page.wait_for_timeout(500)  # late errors (timers, second renders) would show now
        page.screenshot(path=str(ARTIFACTS / "circuit-tracer-supernodes.png"))
        browser.close()
    assert sorted((s["text"].replace("×", "").strip(), s["members"]) for s in shown) == [("first-letter", 2), ("say-acronym", 3)]
    assert drawn == len(data["nodes"])
    assert errors == [], errors
    assert outside == [], outside
