"""The explorer's attention flow in a real browser: click a feature, ask for the heads of one of its
input edges from an earlier position, click the strongest head, read its QK pairs. What the page
shows is checked against the library (head loadings, QK attribution) run by hand."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from helpers.browser import CHROMIUM, NEEDS_EXPLORER
from helpers.serve import build_folder, replacement

from cltrace.graph.graph import Graph
from cltrace.graph.heads import graph_node, head_loadings
from cltrace.graph.qk import qk_attribution

playwright_api = pytest.importorskip("playwright.sync_api")

from cltrace.serve.app import create_app, start_in_thread  # noqa: E402

pytestmark = NEEDS_EXPLORER


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    paths = build_folder(tmp_path_factory.mktemp("browser_attention") / "graphs")
    server, url = start_in_thread(create_app(paths["root"], loader=lambda _metadata: replacement()))
    yield {**paths, "url": url}
    server.should_exit = True


def test_edge_to_heads_to_qk_pairs(served: dict) -> None:
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        pg = browser.new_page(viewport={"width": 1400, "height": 850})
        errors: list[str] = []
        pg.on("pageerror", lambda exc: errors.append(str(exc)))
        pg.goto(served["url"])
        pg.wait_for_function("window.explorer && window.explorer.view.firstPaint", timeout=30_000)
        # a feature with an input from an earlier position among its shown inputs
        target = pg.evaluate(
            "(() => { const v = window.explorer.view; return window.explorer.state.view.nodes.find(n =>"
            " n.kind === 'feature' && v.neighbours(n.id).inputs.some(e => e.node.pos < n.pos)); })()"
        )
        assert target is not None
        pos = pg.evaluate(f"window.explorer.pagePosition({target['id']!r})")
        pg.mouse.click(pos["x"], pos["y"])
        button = pg.locator("#node-panel .heads-link").first
        button.wait_for()
        source_id = pg.evaluate(
            f"(() => {{ const v = window.explorer.view; return v.neighbours({target['id']!r}).inputs"
            f".filter(e => e.node.pos !== {target['pos']})[0].node.id; }})()"
        )
        button.click()
        rows = pg.locator("#heads-table tr")
        rows.first.wait_for(timeout=60_000)
        graph = Graph.load(served["graph"])
        rm = replacement()
        run = rm.run(torch.tensor(graph.metadata["input_ids"]))
        loads = head_loadings(rm, run, graph_node(graph, graph.find(source_id)), graph_node(graph, graph.find(target["id"])))
        best = loads.top(1)[0]
        assert rows.first.locator("button").inner_text() == f"L{best['layer']} H{best['head']}"
        rows.first.locator("button").click()
        pairs = pg.locator("#qk-box .qk-pairs").first.locator("tr")
        pairs.first.wait_for(timeout=60_000)
        source_pos = graph_node(graph, graph.find(source_id)).pos
        want = qk_attribution(rm, run, best["layer"], best["head"], target["pos"], key_positions=[source_pos])
        top = want.top_pairs(want.keys[0], 10)
        assert pairs.count() == len(top)
        shown = float(pairs.first.locator("td.num").inner_text())
        assert shown == pytest.approx(top[0]["value"], rel=1e-2)
        assert errors == []
        browser.close()
