"""Fuzzing the graph explorer's API from its own OpenAPI schema (schemathesis), in-process.

The app serves a folder holding a real graph of a tiny random model, its feature store and
transcoder, a damaged graph, a symlink leading outside and a graph-like file that is not a graph;
interventions and new graphs run for real on the tiny model. Every operation gets schema-valid
requests (positive) and schema-breaking ones (negative), with its ``path`` both generated and drawn
from those files, and intervention bodies, feature numbers and job ids sometimes swapped for real
ones, so that the requests reach the code behind validation and not only the 422 handler.

Property: more than 1,000 requests, and not one answered 5xx (nor raising out of the app).
"""

from __future__ import annotations

import collections
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

fastapi = pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")
from fastapi.testclient import TestClient  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402
from test_serve import build_folder, replacement  # noqa: E402

from cltrace.graph.graph import Graph, NodeKind  # noqa: E402
from cltrace.serve import create_app  # noqa: E402

#: Examples per (operation, variant); with the variants below, well over 1,000 requests in all.
EXAMPLES = 40
MIN_REQUESTS = 1000


def served_paths(root: Path) -> list[str]:
    """`path` values worth sending: the real graph, files that are not graphs, a damaged graph, and
    ways out of the folder (relative, absolute, encoded, through a symlink), overlong names."""
    return [
        "clt/transcoder.safetensors", "features.db", "acronym.explorer.json", "clt", ".", "broken.safetensors",
        "empty.safetensors", "link.safetensors", "../secret.safetensors", "clt/../../secret.safetensors",
        str(root.parent / "secret.safetensors"), "/etc/passwd", "%2e%2e/secret.safetensors", "..%2fsecret.safetensors",
        "acronym.safetensors/x", "a" * 300 + ".safetensors", "d/" * 400 + "g.safetensors", "\\..\\secret.safetensors",
        "~/secret.safetensors", "acronym.safetensors\n", " acronym.safetensors",
    ]


def add_hostile_files(root: Path) -> None:
    """A graph outside the folder with a symlink to it, a truncated graph and an empty one."""
    raw = (root / "acronym.safetensors").read_bytes()
    (root.parent / "secret.safetensors").write_bytes(raw)
    (root / "link.safetensors").symlink_to(root.parent / "secret.safetensors")
    (root / "broken.safetensors").write_bytes(raw[: len(raw) // 3])
    (root / "empty.safetensors").write_bytes(b"")


class Fuzzer:
    """Runs generated requests against the app and tallies the answers."""

    def __init__(self, app: Any, root: Path) -> None:
        self.app = app
        self.schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        self.paths = served_paths(root)
        # half the time the real graph, else one of the other files or ways out; interleaved and at
        # both ends, since hypothesis favours the first and last choices
        self.path_values = st.sampled_from([x for p in self.paths for x in ("acronym.safetensors", p)] + ["acronym.safetensors"])
        graph = Graph.load(root / "acronym.safetensors")
        is_feature = (graph.nodes.kind == int(NodeKind.FEATURE)).tolist()
        ids = graph.node_ids()
        self.feature_ids = [nid for nid, f in zip(ids, is_feature) if f]
        self.other_ids = [nid for nid, f in zip(ids, is_feature) if not f][:20]  # embeddings, errors, logits
        feats = [i for i, f in enumerate(is_feature) if f]
        self.layer_feature = sorted({(int(graph.nodes.layer[i]), int(graph.nodes.feature[i])) for i in feats})
        self.statuses: collections.Counter[tuple[str, int]] = collections.Counter()
        self.failures: list[str] = []

    def real_ids(self, data: st.DataObject, case: Any) -> None:
        """Swap generated node ids, features and job ids for real ones, some of the time."""
        body = case.body
        if isinstance(body, dict):
            items = body.get("interventions")
            if isinstance(items, list) and data.draw(st.booleans()):  # every item a real feature node
                for item in items[:3]:
                    if isinstance(item, dict):
                        item.pop("supernode", None)
                        item["node"] = data.draw(st.sampled_from(self.feature_ids))
                del items[3:]
            elif isinstance(items, list):  # a mix of real nodes of every kind and supernodes
                for item in items:
                    if isinstance(item, dict) and data.draw(st.booleans()):
                        item.pop("supernode", None)
                        item["node"] = data.draw(st.sampled_from(self.feature_ids + self.other_ids))
                    elif isinstance(item, dict) and data.draw(st.booleans()):
                        item.pop("node", None)
                        item["supernode"] = data.draw(st.sampled_from(["fz", "ghost"]))
            if "layer" in body and "feature" in body and data.draw(st.booleans()):
                body["layer"], body["feature"] = data.draw(st.sampled_from(self.layer_feature))
            for key in ("pinned", "members"):
                if isinstance(body.get(key), list) and data.draw(st.booleans()):
                    body[key] = data.draw(st.lists(st.sampled_from(self.feature_ids), max_size=4))
            if isinstance(body.get("supernodes"), list):
                for group in body["supernodes"]:
                    if isinstance(group, dict) and data.draw(st.booleans()):
                        group["name"] = "fz"
                        group["members"] = data.draw(st.lists(st.sampled_from(self.feature_ids), min_size=1, max_size=3, unique=True))
            if "like" in body and data.draw(st.booleans()):
                body["like"] = data.draw(self.path_values)
        if isinstance(case.query, dict) and "layer" in case.query and data.draw(st.booleans()):
            case.query["layer"], case.query["feature"] = data.draw(st.sampled_from(self.layer_feature))
        if "job_id" in (case.path_parameters or {}) and self.app.state.jobs._jobs and data.draw(st.booleans()):
            case.path_parameters["job_id"] = data.draw(st.sampled_from(sorted(self.app.state.jobs._jobs)))

    def send(self, label: str, case: Any) -> None:
        try:
            status = case.call().status_code
        except Exception as exc:  # noqa: BLE001 - an exception out of the app is a server error too
            status, detail = 599, f"{type(exc).__name__}: {exc}"
        else:
            detail = ""
        self.statuses[(label, status)] += 1
        if status >= 500:
            request = f"query={str(case.query):.150} path={case.path_parameters} body={str(case.body):.150}"
            self.failures.append(f"{label} -> {status} {detail:.200} ({request})")

    def run(self, operation: Any, mode: GenerationMode, examples: int, seeded: bool) -> None:
        """`examples` requests to `operation`; `seeded`: with real paths and ids swapped in."""
        has_path = operation.get_parameter("path", "query") is not None
        if seeded and not list(operation.iter_parameters()) and not operation.body:
            return  # nothing to seed
        label = operation.label

        @settings(max_examples=examples, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(data=st.data())
        def one(data: st.DataObject) -> None:
            query = None
            if seeded and has_path:
                query = {"path": data.draw(self.path_values)}
            case = data.draw(operation.as_strategy(generation_mode=mode, query=query))
            if seeded:
                self.real_ids(data, case)
            self.send(label, case)

        try:
            one()
        except Unsatisfiable:
            pass  # no parameters to break: negative mode has nothing to send

    @property
    def total(self) -> int:
        return sum(self.statuses.values())


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = build_folder(tmp_path_factory.mktemp("fuzz") / "graphs")["root"]
    add_hostile_files(root)
    return root


@pytest.fixture
def one_thread() -> Iterator[None]:
    """torch on one thread: the tiny model's products are too small to share, and on a busy machine
    threads waiting for each other make each call many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_fuzzed_requests_never_get_a_server_error(fuzz_root: Path, one_thread: None) -> None:
    app = create_app(fuzz_root, loader=lambda _metadata: replacement())
    fuzzer = Fuzzer(app, fuzz_root)
    start = time.monotonic()
    for result in fuzzer.schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            for seeded in (False, True):
                fuzzer.run(operation, mode, EXAMPLES, seeded)
    generated = fuzzer.total
    # let the background jobs the fuzzer started finish, then poll every one of them
    deadline = time.monotonic() + 30
    while any(j.status in ("queued", "running") for j in app.state.jobs._jobs.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    with TestClient(app, raise_server_exceptions=False) as client:
        jobs = [client.get(f"/api/jobs/{job_id}") for job_id in list(app.state.jobs._jobs)]
    assert jobs and all(r.status_code == 200 for r in jobs)
    fuzzer.statuses[("GET /api/jobs/{job_id}", 200)] += len(jobs)
    # a job that failed in the background says why in a sentence, not as a bare Python exception
    job_errors = [r.json()["error"] for r in jobs if r.json()["status"] == "error"]
    assert not [e for e in job_errors if re.match(r"[A-Z]\w*(Error|Exception): ", e)], job_errors
    assert {r.json()["status"] for r in jobs} <= {"done", "error"}
    elapsed = time.monotonic() - start
    by_status = collections.Counter()
    for (_, status), n in fuzzer.statuses.items():
        by_status[status] += n
    print(f"\n{generated} generated requests (and {len(jobs)} job polls) in {elapsed:.1f} s: {dict(sorted(by_status.items()))}")
    print("answered 2xx:", {k: v for k, v in fuzzer.statuses.items() if k[1] < 300})
    distinct = {f.split(" (query=")[0][:120]: f for f in fuzzer.failures}
    assert not fuzzer.failures, f"{len(fuzzer.failures)} server errors:\n" + "\n".join(distinct.values())
    assert generated >= MIN_REQUESTS
    # the requests got past validation: real graphs viewed, interventions and new graphs run
    assert fuzzer.statuses[("GET /api/graph", 200)] > 0
    assert fuzzer.statuses[("POST /api/graph/intervene", 200)] > 0
    assert fuzzer.statuses[("POST /api/jobs", 202)] > 0
    assert fuzzer.statuses[("PUT /api/graph/state", 200)] > 0
    assert fuzzer.statuses[("PUT /api/graph/label", 200)] > 0
    assert fuzzer.statuses[("GET /api/graph/feature", 200)] > 0
