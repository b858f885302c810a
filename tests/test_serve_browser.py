"""The graph explorer end to end, in a real browser: Debian's headless Chromium driven by Playwright
against `cltrace serve`'s app on a free local port.

One walk through what a researcher does on the acronym graph of a tiny random model: hover a
feature (tooltip), click it (feature page with contexts), pin two nodes (the pinned subgraph),
group two features into a supernode, run an intervention on it (result shown), and compute a new
graph from a prompt (progress, then the graph). What the page shows is checked against the graph
file, the feature store and the sidecar file on disk. Screenshots go to test-artifacts/serve/.

Then the guards, as a browser meets them: the URL `cltrace serve --token` prints opens the explorer
(its token becomes a cookie the page's own requests carry) and a page without it is refused; a name
re-pointed at 127.0.0.1 (DNS rebinding, Chromium's --host-resolver-rules) gets 403.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from helpers.browser import ARTIFACTS_ROOT, CHROMIUM, NEEDS_EXPLORER
from helpers.cli import run_cli
from helpers.serve import ACRONYM, build_folder, replacement

from cltrace.features import FeatureStore
from cltrace.graph.graph import Graph

playwright_api = pytest.importorskip("playwright.sync_api")

from cltrace.serve.app import create_app, free_port, start_in_thread  # noqa: E402

ARTIFACTS = ARTIFACTS_ROOT / "serve"
pytestmark = NEEDS_EXPLORER


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The app on a free port of 127.0.0.1, in a thread of this process."""
    paths = build_folder(tmp_path_factory.mktemp("browser") / "graphs")
    server, url = start_in_thread(create_app(paths["root"], loader=lambda _metadata: replacement()))
    yield {**paths, "url": url}
    server.should_exit = True


@pytest.fixture(scope="module")
def page(served: dict) -> Iterator:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright_api.sync_playwright() as p:
        # evil.example resolves to this machine, as a rebinding attacker's name would
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--host-resolver-rules=MAP evil.example 127.0.0.1"])
        pg = browser.new_page(viewport={"width": 1400, "height": 850})
        errors: list[str] = []
        pg.on("pageerror", lambda exc: errors.append(str(exc)))
        pg.goto(served["url"])
        pg.wait_for_function("window.explorer && window.explorer.view.firstPaint", timeout=30_000)
        pg.errors = errors
        yield pg
        browser.close()


def shot(pg, name: str) -> None:
    pg.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def top_features(pg, k: int) -> list[dict]:
    """The k most influential feature nodes of the graph on the page."""
    return pg.evaluate(
        f"window.explorer.state.view.nodes.filter(n => n.kind === 'feature')"
        f".sort((a, b) => a.influence - b.influence).slice(0, {k})"
    )


def point(pg, node_id: str) -> tuple[float, float]:
    pos = pg.evaluate(f"window.explorer.pagePosition({json.dumps(node_id)})")
    return pos["x"], pos["y"]


def test_explore_the_acronym_graph(page, served: dict) -> None:
    pg = page
    graph = Graph.load(served["graph"])
    # the graph: prompt tokens along the bottom, pruned nodes and edges drawn
    assert pg.locator("#prompt-line").inner_text() == ACRONYM
    view = pg.evaluate("window.explorer.state.view")
    assert view["metadata"]["n_nodes_full"] == graph.n_nodes and len(view["nodes"]) > 0
    embeddings = sorted((n for n in view["nodes"] if n["kind"] == "embedding"), key=lambda n: n["pos"])
    xs = [point(pg, n["id"]) for n in embeddings]
    assert all(a[0] < b[0] for a, b in zip(xs, xs[1:])), "tokens left to right"
    logit = next(n for n in view["nodes"] if n["kind"] == "logit")
    assert point(pg, logit["id"])[1] < xs[0][1], "logits above the tokens"
    shot(pg, "01-graph")

    # hover: the tooltip names the feature, its activation and the tokens it promotes
    a, b = top_features(pg, 2)
    with FeatureStore(served["db"]) as store:
        page_a = store.page(a["layer"], a["feature"])
    pg.mouse.move(*point(pg, a["id"]))
    tip = pg.locator("#tooltip")
    tip.wait_for(state="visible")
    pg.wait_for_function("document.querySelector('#tooltip .promoted').textContent.includes('promotes')")
    text = tip.inner_text()
    assert a["id"] in text and page_a.display_label in text and f"activation {a['activation']:.3g}"[:14] in text
    assert page_a.promoted[0].text.strip() in text
    shot(pg, "02-hover")

    # click: the feature page, with its top contexts and each token's activation
    pg.mouse.click(*point(pg, a["id"]))
    contexts = pg.locator("#feature-page .context")
    contexts.first.wait_for()
    assert contexts.count() == len(page_a.top)
    assert contexts.first.inner_text().replace("␣", " ") == "".join(page_a.top[0].texts).replace("\n", "⏎")
    marked = contexts.first.locator(".mark")
    assert marked.inner_text().replace("␣", " ") == page_a.top[0].texts[page_a.top[0].mark]
    assert pg.locator("#node-panel").get_by_text("Strongest inputs").count() == 1
    shot(pg, "03-feature-page")

    # pin two nodes: the pinned list, the sidecar file, and the pinned subgraph view
    pg.locator("#pin-btn").click()
    pg.mouse.click(*point(pg, b["id"]))
    pg.locator("#pin-btn").click()
    pg.wait_for_function("document.querySelectorAll('#pinned-list li[data-node]').length === 2")
    sidecar = served["root"] / "acronym.explorer.json"
    assert json.loads(sidecar.read_text())["qParams"]["pinnedIds"] == [a["id"], b["id"]]
    pg.locator("#only-pinned").check()
    shot(pg, "04-pinned-subgraph")
    assert pg.evaluate("window.explorer.view.nodes.filter(n => window.explorer.view.isShown(n)).length") == 2
    pg.locator("#only-pinned").uncheck()

    # a supernode of two features chosen with Ctrl-click
    pg.mouse.click(*point(pg, a["id"]))
    pg.keyboard.down("Control")
    pg.mouse.click(*point(pg, b["id"]))
    pg.keyboard.up("Control")
    pg.locator("#supernode-name").fill("acronym-pair")
    pg.locator("#make-supernode").click()
    pg.locator("#supernode-list li[data-supernode='acronym-pair']").wait_for()
    pg.wait_for_function(
        "fetch('/api/graph/state?path=acronym.safetensors').then(r => r.json())"
        ".then(s => s.supernodes.length === 1)"
    )
    assert json.loads(sidecar.read_text())["qParams"]["supernodes"] == [["acronym-pair", a["id"], b["id"]]]
    shot(pg, "05-supernode")

    # an intervention on the supernode: top tokens before and after, beside the graph's prediction
    pg.locator("#supernode-list li[data-supernode='acronym-pair'] button", has_text="Intervene").click()
    pg.locator("#iv-run").click()
    pg.locator("#iv-top").wait_for()
    before = pg.locator("#iv-top tr").nth(1).locator("td").first.inner_text()
    assert before.strip("“”").replace("␣", " ") == graph.metadata["targets"][0]["label"]
    assert pg.locator("#iv-prediction tr").count() == len(graph.metadata["targets"]) + 1
    assert f"{a['layer']}:{a['feature']}@{a['pos']}=x0" in pg.locator("#iv-result").inner_text()
    pg.locator("#iv-result").scroll_into_view_if_needed()
    shot(pg, "06-intervention")

    # a new graph from a prompt: progress while it runs, then the new graph on screen
    pg.evaluate(
        "window.seen = []; new MutationObserver(() => window.seen.push(document.querySelector('#job-status').textContent))"
        ".observe(document.querySelector('#job-status'), {childList: true, characterData: true, subtree: true})"
    )
    pg.locator("#new-graph-btn").click()
    pg.locator("#new-prompt").fill("The World Health Organization (W")
    pg.locator("#new-max").fill("100")
    pg.locator("#new-start").click()
    pg.wait_for_function("document.querySelector('#prompt-line').textContent.startsWith('The World')", timeout=60_000)
    seen = pg.evaluate("window.seen")
    assert any("·" in s for s in seen), seen  # a stage line "attributing · n of m rows · s" was shown
    assert pg.locator("#graph-select").input_value() == "The-World-Health-Organization-W.safetensors"
    assert (served["root"] / "The-World-Health-Organization-W.safetensors").is_file()
    pg.wait_for_function("window.explorer.view.firstPaint")
    shot(pg, "07-new-graph")
    assert pg.errors == []


def test_the_printed_url_with_its_token_opens_the_explorer(page, served: dict, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """`cltrace serve --token` (the token a server beyond loopback needs, enforced on loopback when
    given): the printed URL opens the explorer, whose own requests (a PUT among them) carry the token
    as a cookie; the same address without the token is refused."""
    import uvicorn

    port, running = free_port(), []
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **_kw: running.append(start_in_thread(app, host=host, port=port)[0]))
    code, out, err = run_cli("serve", str(served["root"]), "--port", str(port), "--token", "browser-token", capsys=capsys)
    assert code == 0 and running, err
    printed = out.split(" at ")[1].split(" ")[0]
    assert printed == f"http://127.0.0.1:{port}/?token=browser-token"
    pg = page.context.browser.new_page()
    try:
        pg.goto(printed)
        pg.wait_for_function("window.explorer && window.explorer.view.firstPaint", timeout=30_000)
        shown = pg.locator("#graph-select").input_value()  # the graph list and a graph came through
        assert pg.locator("#prompt-line").inner_text() == Graph.load(served["root"] / shown).metadata["prompt"]
        node = top_features(pg, 1)[0]["id"]
        status = pg.evaluate(
            "([path, id]) => fetch('/api/graph/state?path=' + encodeURIComponent(path), {method: 'PUT', headers: "
            "{'Content-Type': 'application/json'}, body: JSON.stringify({pinned: [id]})}).then(r => r.status)", [shown, node])
        assert status == 200
        sidecar = served["root"] / shown.replace(".safetensors", ".explorer.json")
        assert json.loads(sidecar.read_text())["qParams"]["pinnedIds"] == [node]
        shot(pg, "08-token-url")
        fresh = page.context.browser.new_context().new_page()  # no cookie: the address alone is refused
        response = fresh.goto(f"http://127.0.0.1:{port}/api/graphs")
        assert response.status == 401 and "token" in response.json()["detail"]
        fresh.context.close()
    finally:
        pg.close()
        for server in running:
            server.should_exit = True


def test_a_rebound_name_gets_403_in_the_browser(page, served: dict) -> None:
    """A page of evil.example whose name now points at 127.0.0.1 reaches the server, which refuses
    its Host: neither the page nor the graph list comes back."""
    port = served["url"].rstrip("/").rsplit(":", 1)[1]
    pg = page.context.browser.new_page()
    try:
        for target in ["/", "/api/graphs"]:
            response = pg.goto(f"http://evil.example:{port}{target}")
            assert response.status == 403 and "is not this server's" in response.json()["detail"]
            assert ACRONYM not in pg.content()
    finally:
        pg.close()
