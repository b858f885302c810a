"""The explorer's circuit view and the full graph's edges, in a real browser (Debian's headless
Chromium driven by Playwright) against `cltrace serve`'s app on a trace folder of the tiny model's
acronym graph with its circuit.json.

The explorer opens on the circuit view: the circuit's boxes, labels, effects and validation as the
file has them; a supernode is renamed, two are merged and one is split, each checked against the
file on disk; the full graph is one click away, where the strongest edges only are drawn (counted at
the default and after the slider moves) and a hovered node's own edges on top. Screenshots go to
test-artifacts/serve/.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator

import pytest
from helpers.browser import ARTIFACTS_ROOT, CHROMIUM, NEEDS_EXPLORER
from helpers.serve import build_trace_folder, replacement

playwright_api = pytest.importorskip("playwright.sync_api")

from cltrace.serve.app import create_app, start_in_thread  # noqa: E402

ARTIFACTS = ARTIFACTS_ROOT / "serve"
pytestmark = NEEDS_EXPLORER


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    paths = build_trace_folder(tmp_path_factory.mktemp("browser-circuit") / "traces")

    def slow_loader(_metadata: dict):  # the tiny model loads in no time: slowed, so that progress shows
        time.sleep(1.0)
        return replacement()

    server, url = start_in_thread(create_app(paths["root"], loader=slow_loader))
    yield {**paths, "url": url}
    server.should_exit = True


@pytest.fixture(scope="module")
def browser(served: dict) -> Iterator:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def open_page(browser, url: str):
    pg = browser.new_page(viewport={"width": 1400, "height": 850})
    pg.errors = []
    pg.on("pageerror", lambda exc: pg.errors.append(str(exc)))
    pg.on("console", lambda msg: msg.type == "error" and pg.errors.append(msg.text))
    pg.goto(url)
    pg.wait_for_function("window.explorer && window.explorer.view.firstPaint", timeout=30_000)
    return pg


def on_disk(served: dict) -> dict:
    return json.loads(served["circuit"].read_text())


def box_text(pg, sid: str) -> str:
    return pg.locator(f".cnode[data-id='{sid}']").text_content()


def test_full_graph_draws_the_strongest_edges_and_a_hovered_nodes_own(browser, served: dict) -> None:
    pg = open_page(browser, served["url"] + "?view=graph")
    try:
        assert pg.locator("#canvas-wrap").is_visible() and not pg.locator("#circuit-wrap").is_visible()
        total = pg.evaluate("window.explorer.state.view.edges.weight.length")
        assert total > 300  # the pruned acronym graph: more edges than the default draws
        assert pg.evaluate("window.explorer.view.drawnEdges") == 300
        assert pg.locator("#edges-value").inner_text() == "300"
        assert "300 of" in pg.locator("#counts").inner_text()
        pg.locator("#graph").screenshot(path=str(ARTIFACTS / "c01-strongest-edges.png"))
        slider = pg.locator("#edges")
        steps = pg.evaluate("document.getElementById('edges').steps")
        for index, expected in [(len(steps) - 1, total), (0, 0), (steps.index(100), 100)]:
            slider.fill(str(index))  # an input event, as dragging sends
            assert pg.evaluate("window.explorer.view.drawnEdges") == expected
            assert pg.locator("#edges-value").inner_text() == ("all" if expected == total else str(expected))
        # the drawn edges are the strongest: none left out is stronger than the weakest drawn
        weights = sorted((abs(w) for w in pg.evaluate("window.explorer.state.view.edges.weight")), reverse=True)
        order = pg.evaluate("Array.from(window.explorer.view._order.slice(0, 100))")
        drawn = sorted((abs(pg.evaluate(f"window.explorer.state.view.edges.weight[{e}]")) for e in order[:5]), reverse=True)
        assert drawn == weights[:5]
        # hovering a node draws every one of its own edges on top, the weak ones too
        node = pg.evaluate("window.explorer.state.view.nodes.filter(n => n.kind === 'feature').sort((a, b) => a.influence - b.influence)[0]")
        degree = pg.evaluate(f"window.explorer.view.neighbours({json.dumps(node['id'])}, 1e9)")
        pos = pg.evaluate(f"window.explorer.pagePosition({json.dumps(node['id'])})")
        pg.mouse.move(pos["x"], pos["y"])
        n_own = len(degree["inputs"]) + len(degree["outputs"])
        pg.wait_for_function(f"window.explorer.view.overlayEdges === {n_own}")
        pg.locator("#graph").screenshot(path=str(ARTIFACTS / "c02-hovered-node-edges.png"))
        assert pg.errors == []
    finally:
        pg.close()
    for asked, expected in [("all", total), ("40", 40)]:  # the address may ask for a count (the benchmark asks for all)
        pg = open_page(browser, served["url"] + f"?view=graph&edges={asked}")
        try:
            assert pg.evaluate("window.explorer.view.drawnEdges") == expected
        finally:
            pg.close()


def test_circuit_view_rename_merge_split(browser, served: dict) -> None:
    before = on_disk(served)
    pg = open_page(browser, served["url"])
    try:
        # it opens on the circuit: the boxes, labels, effects and validation of the file
        pg.locator(".cnode").first.wait_for()
        assert pg.locator("#tab-circuit").get_attribute("class") == "active"
        assert not pg.locator("#canvas-wrap").is_visible()
        assert pg.locator(".cnode").count() == len(before["supernodes"])
        assert pg.locator(".ctoken").count() == len(before["inputs"]) and pg.locator(".coutput").count() == 1
        assert pg.locator("path.cedge").count() == len(before["edges"])
        s0, s1, s2, s3 = before["supernodes"]
        assert s0["name"] in box_text(pg, "s0") and s0["output_label"] in box_text(pg, "s0")
        assert "label unclear" in box_text(pg, "s3")  # its labels failed their tests
        assert f"effect {s0['effect']:+.2g}"[:10] in box_text(pg, "s0")
        numbers = pg.locator("#circuit-numbers").inner_text()
        assert "0.930" in numbers and "40.0×" in numbers and "p 50.0% → 10.0%" in numbers
        pg.locator(".cnode[data-id='s0']").click()
        labels = pg.locator("#cv-labels").inner_text()
        assert s0["input_label"] in labels and "0.90" in labels and "not scored" in labels
        assert "Δp predicted −10.0%, actual −12.0%" in pg.locator("#cv-validation").inner_text()
        pg.screenshot(path=str(ARTIFACTS / "c03-circuit.png"))

        # rename: the box and the file
        pg.locator(".cnode[data-id='s1']").click()
        pg.locator("#cv-name").fill("says the next letter")
        pg.locator("#cv-rename").click()
        pg.wait_for_function("document.querySelector(\".cnode[data-id='s1']\").textContent.includes('says the next letter')")
        after = on_disk(served)
        assert after["supernodes"][1]["name"] == "says the next letter"
        assert after["supernodes"][1]["effect"] == s1["effect"] and after["edited"] is False

        # merge: Ctrl-click two boxes, merge them into the first
        pg.locator(".cnode[data-id='s0']").click()
        pg.locator(".cnode[data-id='s2']").click(modifiers=["Control"])
        pg.locator("#cv-merge-name").fill("early and late")
        pg.locator("#cv-merge").click()
        pg.wait_for_function("document.querySelectorAll('.cnode').length === 3")
        after = on_disk(served)
        assert [s["id"] for s in after["supernodes"]] == ["s0", "s1", "s3"]
        assert after["supernodes"][0]["members"] == s0["members"] + s2["members"] and after["edited"] is True
        assert "edited" in pg.locator(".cnode[data-id='s0']").get_attribute("class")
        assert "supernodes changed since" in pg.locator("#circuit-numbers").inner_text()
        assert "Re-validate" in pg.locator("#cv-validation").inner_text()
        pg.screenshot(path=str(ARTIFACTS / "c04-merged.png"))

        # split: tick one member of the merged supernode and move it out
        moved = s2["members"][0]
        pg.locator(f"#cv-members input[value='{moved}']").check()
        pg.locator("#cv-split-name").fill("moved out")
        pg.locator("#cv-split").click()
        pg.wait_for_function("document.querySelectorAll('.cnode').length === 4")
        after = on_disk(served)
        assert [s["id"] for s in after["supernodes"]] == ["s0", "s0.2", "s1", "s3"]
        assert after["supernodes"][1]["members"] == [moved] and after["supernodes"][1]["name"] == "moved out"
        assert moved not in after["supernodes"][0]["members"]

        # a refused edit says why, and changes nothing
        pg.locator(".cnode[data-id='s1']").click()
        pg.locator("#cv-name").fill(" ")
        pg.locator("#cv-rename").click()
        assert on_disk(served) == after

        # the full graph is one click away, with the supernode's members selected there
        pg.locator(".cnode[data-id='s3']").click()
        pg.locator("#cv-show").click()
        assert pg.locator("#canvas-wrap").is_visible() and not pg.locator("#circuit-wrap").is_visible()
        shown = set(pg.evaluate("window.explorer.state.view.nodes.map(n => n.id)"))
        assert sorted(pg.evaluate("[...window.explorer.state.selected]")) == sorted(m for m in s3["members"] if m in shown)
        assert pg.evaluate("window.explorer.state.selected.size") > 0
        pg.locator("#tab-circuit").click()
        assert pg.locator("#circuit-wrap").is_visible()
        assert pg.errors == []
    finally:
        pg.close()
        served["circuit"].write_text(json.dumps(before, indent=1))


def test_revalidate_shows_progress_then_the_new_numbers(browser, served: dict) -> None:
    """Merge two supernodes, then Re-validate: the job's stages show while it runs, then the numbers
    the server saved (each supernode's ablation, the circuit's against random features)."""
    before = on_disk(served)
    pg = open_page(browser, served["url"])
    try:
        pg.locator(".cnode").first.wait_for()
        pg.locator(".cnode[data-id='s2']").click()
        pg.locator(".cnode[data-id='s3']").click(modifiers=["Control"])
        pg.locator("#cv-merge").click()
        pg.wait_for_function("document.querySelectorAll('.cnode.edited').length === 1")
        pg.evaluate(
            "window.seen = []; new MutationObserver(() => window.seen.push(document.querySelector('#circuit-panel').textContent))"
            ".observe(document.querySelector('#circuit-panel'), {childList: true, characterData: true, subtree: true})"
        )
        pg.locator("#cv-validate").click()
        pg.wait_for_function("document.querySelector('#cv-status').textContent.startsWith('validated')", timeout=120_000)
        seen = pg.evaluate("window.seen")
        assert any("loading model" in s for s in seen), seen[:3]
        after = on_disk(served)
        assert not after.get("edited") and after["validation"]["pearson_r"] != before["validation"]["pearson_r"]
        numbers = pg.locator("#circuit-numbers").inner_text()
        c = after["validation"]["circuit_ablation"]
        assert f"p {100 * c['p_before']:.1f}% → {100 * c['p_after']:.1f}%" in numbers
        assert "supernodes changed" not in numbers
        assert pg.locator(".cnode.edited").count() == 0
        assert pg.locator(".cnode").count() == len(after["supernodes"])
        sid = after["supernodes"][0]["id"]
        pg.locator(f".cnode[data-id='{sid}']").click()
        a = after["supernodes"][0]["validation"]["ablate"]
        assert f"ablated: p {100 * a['p_before']:.1f}% → {100 * a['p_after']:.1f}%" in pg.locator("#cv-validation").inner_text()
        pg.screenshot(path=str(ARTIFACTS / "c05-revalidated.png"))
        assert pg.errors == []
    finally:
        pg.close()
        served["circuit"].write_text(json.dumps(before, indent=1))


def test_each_graph_opens_on_its_circuit_where_it_has_one(browser, served: dict) -> None:
    other = served["root"] / "other.safetensors"  # a graph without a circuit beside it
    shutil.copy(served["graph"], other)
    pg = open_page(browser, served["url"])
    try:
        pg.locator(".cnode").first.wait_for()
        pg.locator("#graph-select").select_option("other.safetensors")
        pg.wait_for_function("window.explorer.state.path === 'other.safetensors' && window.explorer.state.tab === 'graph'")
        assert pg.locator("#tab-circuit").is_disabled() and pg.locator("#canvas-wrap").is_visible()
        pg.locator("#graph-select").select_option(served["rel"])
        pg.wait_for_function("window.explorer.state.tab === 'circuit'")
        assert pg.locator("#circuit-wrap").is_visible() and pg.locator(".cnode").count() == len(on_disk(served)["supernodes"])
        assert pg.errors == []
    finally:
        pg.close()
        other.unlink()
