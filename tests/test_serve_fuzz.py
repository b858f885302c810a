"""Fuzzing the graph explorer's API from its own OpenAPI schema (schemathesis), on a real server.

The app serves a folder holding a real graph of a tiny random model, its feature store and
transcoder, a damaged graph, a symlink leading outside and a graph-like file that is not a graph;
interventions and new graphs run for real on the tiny model. Every operation gets schema-valid
requests (positive) and schema-breaking ones (negative), with its ``path`` both generated and drawn
from those files, and intervention bodies, feature numbers and job ids sometimes swapped for real
ones, so that the requests reach the code behind validation and not only the 422 handler. Each
request also carries a generated Host (the server's, a loopback name, or a foreign one) and Origin
(none, the server's own, or another page's).

Property: more than 1,000 requests, not one answered 5xx (nor raising out of the app), every one with
a foreign Host answered 403, every state-changing one from a foreign Origin answered 403, and no file
changed but those the accepted requests wrote. A slower run (`slow` marker) sends at least 1,000
requests to each route, schema-generated and hand-made bad ones (bytes, content types, headers).
"""

from __future__ import annotations

import collections
import hashlib
import http.client
import json
import random
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

fastapi = pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")
from helpers.serve import build_folder, hand_circuit, replacement  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402

from cltrace.graph.graph import Graph, NodeKind  # noqa: E402
from cltrace.serve import create_app  # noqa: E402
from cltrace.serve.app import start_in_thread  # noqa: E402
from cltrace.serve.security import STATE_CHANGING  # noqa: E402

#: Examples per (operation, variant); with the variants below, well over 1,000 requests in all.
EXAMPLES = 40
MIN_REQUESTS = 1000
#: Host headers refused whatever the route (the server's own and loopback names are added per server).
FOREIGN_HOSTS = ["evil.example", "evil.example:8000", "127.0.0.1.nip.io", "localhost.evil.example", "10.0.0.1", "[::2]"]
#: Origins of other pages; "own" stands for the server's own.
FOREIGN_ORIGINS = ["http://evil.example", "null", "https://evil.example:443", "http://127.0.0.1:1"]


def digests(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    """Files added, removed or rewritten between two `digests`."""
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


#: What accepted requests may write in the served folder: saved work, labels (the feature store and
#: its SQLite journal files), the circuit and its supernodes, and new graphs (checked against the jobs' own list).
WRITABLE = re.compile(r"(\.explorer\.json|(^|/)(circuit|supernodes)\.json|(^|/)features\.db(-wal|-shm|-journal)?)$")


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

    def __init__(self, app: Any, root: Path, url: str) -> None:
        self.app = app
        self.schema = schemathesis.openapi.from_url(url + "openapi.json")
        own = url.removeprefix("http://").rstrip("/")
        self.own_host = own
        self.hosts = st.sampled_from([own, own, own, f"localhost:{own.rsplit(':', 1)[1]}", "localhost", *FOREIGN_HOSTS, own])
        self.origins = st.sampled_from([None, "own", None, *FOREIGN_ORIGINS, "own", None])
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

    def send(self, label: str, case: Any, host: str, origin: str | None) -> None:
        headers = {"Host": host}
        if origin is not None:
            headers["Origin"] = f"http://{host}" if origin == "own" else origin
        try:
            status = case.call(headers=headers, timeout=60).status_code
        except Exception as exc:  # noqa: BLE001 - an exception out of the app is a server error too
            status, detail = 599, f"{type(exc).__name__}: {exc}"
        else:
            detail = ""
        self.statuses[(label, status)] += 1
        foreign_host = host in FOREIGN_HOSTS
        foreign_origin = origin not in (None, "own") and case.method.upper() in STATE_CHANGING
        request = f"headers={headers} query={str(case.query):.150} path={case.path_parameters} body={str(case.body):.150}"
        if status >= 500:
            self.failures.append(f"{label} -> {status} {detail:.200} ({request})")
        elif (foreign_host or foreign_origin) and status != 403:
            self.failures.append(f"{label} -> {status}, not 403 for a foreign Host or Origin ({request})")

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
            self.send(label, case, data.draw(self.hosts), data.draw(self.origins))

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
    circuit = hand_circuit(Graph.load(root / "acronym.safetensors"))  # the circuit routes reach their code too
    (root / "circuit.json").write_text(json.dumps({**circuit, "graph": "acronym.safetensors"}))
    return root


@pytest.fixture
def one_thread() -> Iterator[None]:
    """torch on one thread: the tiny model's products are too small to share, and on a busy machine
    threads waiting for each other make each call many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def wait_for_jobs(app: Any, seconds: float = 60) -> None:
    """Until no background job is queued or running (or `seconds` pass)."""
    deadline = time.monotonic() + seconds
    while any(j.status in ("queued", "running", "cancelling") for j in app.state.jobs._jobs.values()) \
            and time.monotonic() < deadline:
        time.sleep(0.1)


def assert_only_accepted_writes(app: Any, root: Path, before: dict[str, str]) -> None:
    """No file under root's parent changed but saved work, labels and the jobs' new graphs."""
    new_graphs = {f"{root.name}/{j.graph}" for j in app.state.jobs._jobs.values() if j.graph}
    unexpected = {k for k in changed(before, digests(root.parent))
                  if k not in new_graphs and not (k.startswith(f"{root.name}/") and WRITABLE.search(k))}
    assert not unexpected, unexpected


@pytest.mark.slow
def test_fuzzed_requests_never_get_a_server_error(fuzz_root: Path, one_thread: None) -> None:
    app = create_app(fuzz_root, loader=lambda _metadata: replacement())
    server, url = start_in_thread(app)
    before = digests(fuzz_root.parent)
    try:
        fuzzer = Fuzzer(app, fuzz_root, url)
        start = time.monotonic()
        for result in fuzzer.schema.get_all_operations():
            operation = result.ok()
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                for seeded in (False, True):
                    fuzzer.run(operation, mode, EXAMPLES, seeded)
        generated = fuzzer.total
        # let the background jobs the fuzzer started finish, then poll every one of them
        wait_for_jobs(app, 30)
        conn = http.client.HTTPConnection(*server.servers[0].sockets[0].getsockname()[:2], timeout=30)
        jobs = []
        for job_id in list(app.state.jobs._jobs):
            conn.request("GET", f"/api/jobs/{job_id}")
            resp = conn.getresponse()
            jobs.append((resp.status, json.loads(resp.read())))
        conn.close()
    finally:
        server.should_exit = True
    assert jobs and all(status == 200 for status, _ in jobs)
    fuzzer.statuses[("GET /api/jobs/{job_id}", 200)] += len(jobs)
    # a job that failed in the background says why in a sentence, not as a bare Python exception
    job_errors = [job["error"] for _, job in jobs if job["status"] == "error"]
    assert not [e for e in job_errors if re.match(r"[A-Z]\w*(Error|Exception): ", e)], job_errors
    assert {job["status"] for _, job in jobs} <= {"done", "error", "cancelled"}
    elapsed = time.monotonic() - start
    by_status = collections.Counter()
    for (_, status), n in fuzzer.statuses.items():
        by_status[status] += n
    print(f"\n{generated} generated requests (and {len(jobs)} job polls) in {elapsed:.1f} s: {dict(sorted(by_status.items()))}")
    print("answered 2xx:", {k: v for k, v in fuzzer.statuses.items() if k[1] < 300})
    distinct = {f.split(" (headers=")[0][:120]: f for f in fuzzer.failures}
    assert not fuzzer.failures, f"{len(fuzzer.failures)} server errors or missed refusals:\n" + "\n".join(distinct.values())
    assert generated >= MIN_REQUESTS
    # the requests got past validation: real graphs viewed, interventions and new graphs run
    assert fuzzer.statuses[("GET /api/graph", 200)] > 0
    assert fuzzer.statuses[("POST /api/graph/intervene", 200)] > 0
    assert fuzzer.statuses[("POST /api/jobs", 202)] > 0
    assert fuzzer.statuses[("PUT /api/graph/state", 200)] > 0
    assert fuzzer.statuses[("PUT /api/graph/label", 200)] > 0
    assert fuzzer.statuses[("GET /api/graph/feature", 200)] > 0
    assert sum(n for (label, code), n in fuzzer.statuses.items() if code == 403) > 0
    assert_only_accepted_writes(app, fuzz_root, before)


#: Requests sent to each route by the slow run.
PER_ROUTE = 1000


class BadInput:
    """Hand-made requests for one route at a time: mostly bad (foreign Host or Origin, wrong content
    type, bytes that are not JSON or not UTF-8, wrong JSON types, hostile paths and numbers), some
    valid; seeded, on one kept-alive connection."""

    def __init__(self, address: tuple[str, int], root: Path, seed: int = 0) -> None:
        self.address, self.rng = address, random.Random(seed)
        self.own = f"{address[0]}:{address[1]}"
        self.paths = served_paths(root)
        graph = Graph.load(root / "acronym.safetensors")
        kinds = graph.nodes.kind.tolist()
        self.features = [nid for nid, k in zip(graph.node_ids(), kinds) if k == int(NodeKind.FEATURE)]
        pos, ids = graph.nodes.pos.tolist(), graph.node_ids()
        # an edge across positions into a feature, for the head-loading route
        self.cross_edge = next((ids[int(s)], ids[int(t)]) for s, t in zip(graph.edge_source.tolist(), graph.edge_target.tolist())
                               if pos[int(s)] < pos[int(t)] and kinds[int(t)] == int(NodeKind.FEATURE)
                               and kinds[int(s)] in (int(NodeKind.FEATURE), int(NodeKind.EMBEDDING)))
        self.conn = http.client.HTTPConnection(*address, timeout=60)

    def junk(self) -> Any:
        """A JSON value of any type, sometimes absurd."""
        return self.rng.choice([None, True, -1, 0, 2**31, 10**30, -1e308, 1e308, 0.5, "", "x" * 5000, "\u202e\u0000",
                                [], [1, "a"], {}, {"a": {"b": [None]}}, self.rng.choice(self.features), "../secret"])

    def path(self) -> str:
        value = self.rng.choice(["acronym.safetensors"] * 3 + self.paths + [self.junk_text()])
        return quote(value, safe=self.rng.choice(["/%", "", "/", "/%\\~"]))  # '%' kept: sent as it is, double-encoded or not

    def junk_text(self) -> str:
        return "".join(self.rng.choice("ab./%\\~\x00é%2e%2F") for _ in range(self.rng.randint(0, 40)))

    def body(self, valid: dict[str, Any]) -> bytes:
        """`valid` as JSON, or a damaged or altered version of it."""
        raw = json.dumps(valid).encode()
        how = self.rng.randrange(7)
        if how == 0:
            return raw
        if how == 1:
            return raw[: self.rng.randrange(len(raw) + 1)]
        if how == 2:
            return bytes(self.rng.randrange(256) for _ in range(self.rng.randrange(64)))
        if how == 3:
            return raw.replace(b'"', b"'", 1) + b"\xff\xfe"
        if how == 4:
            return json.dumps({k: self.junk() for k in valid}).encode()
        if how == 5:
            return json.dumps({**valid, self.rng.choice(list(valid)): self.junk()}).encode()
        return json.dumps(self.rng.choice([[valid], "text", 3, None, {"nested": [[[[[[valid]]]]]]}])).encode()

    def send(self, method: str, target: str, body: bytes | None, headers: dict[str, str]) -> int:
        for attempt in range(2):  # the server may close a connection after an error: open another
            try:
                self.conn.request(method, target, body=body, headers=headers)
                resp = self.conn.getresponse()
                resp.read()
                return resp.status
            except (http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = http.client.HTTPConnection(*self.address, timeout=60)
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def one(self, method: str, route: str, valid: dict[str, Any] | None, query: str) -> tuple[int, str]:
        """One request to `route`: (status, what kind of request it was)."""
        r = self.rng.random()
        headers = {"Host": self.own, "Content-Type": "application/json"}
        kind = "bad"
        if r < 0.15:
            headers["Host"], kind = self.rng.choice(FOREIGN_HOSTS), "foreign host"
        elif r < 0.3 and method in STATE_CHANGING:
            headers["Origin"], kind = self.rng.choice(FOREIGN_ORIGINS), "foreign origin"
        elif r < 0.4:
            headers["Content-Type"] = self.rng.choice(["text/plain", "application/x-www-form-urlencoded",
                                                       "multipart/form-data; boundary=x", "application/json; charset=latin-1"])
        elif r < 0.5:
            kind = "valid"
            if self.rng.random() < 0.5:  # the explorer's own page; else none, as from curl
                headers["Origin"] = f"http://{self.own}"
        body = None
        if valid is not None:
            body = json.dumps(valid).encode() if kind == "valid" else self.body(valid)
        if kind != "valid" and "{path}" in query:
            query = query.replace("{path}", self.path())
        query = query.replace("{path}", "acronym.safetensors")
        if kind == "bad" and self.rng.random() < 0.3:
            query += self.rng.choice(["&layer=-1", "&feature=1e9", "&node_threshold=nan", "&full=maybe", "&x=%ff", "&layer=99999999999999999999"])
        return self.send(method, route + query, body, headers), kind


@pytest.mark.slow
def test_a_thousand_bad_requests_per_route(fuzz_root: Path, one_thread: None) -> None:
    """At least PER_ROUTE requests to each route, mostly bad: no 5xx, every foreign Host and every
    state-changing foreign Origin 403, and no file changed but what the accepted requests wrote."""
    app = create_app(fuzz_root, loader=lambda _metadata: replacement())
    app.state.jobs.max_jobs = 100_000  # remember every job, so that each new graph is traced to the job that wrote it
    server, _ = start_in_thread(app)
    address = server.servers[0].sockets[0].getsockname()[:2]
    before = digests(fuzz_root.parent)
    bad = BadInput(address, fuzz_root)
    a, b = bad.features[:2]
    job = json.loads(http_post(address, "/api/jobs", {"prompt": "AB", "max_feature_nodes": 5}))["id"]
    routes: list[tuple[str, str, dict[str, Any] | None, str]] = [
        ("GET", "/", None, ""), ("GET", "/static/app.js", None, ""), ("GET", "/openapi.json", None, ""),
        ("GET", "/api/info", None, ""), ("GET", "/api/graphs", None, ""),
        ("GET", "/api/graph", None, "?path={path}&node_threshold=0.5"), ("GET", "/api/graph/state", None, "?path={path}"),
        ("GET", "/api/graph/feature", None, "?path={path}&layer=0&feature=1"),
        ("GET", "/api/graph/heads", None, f"?path={{path}}&source={bad.cross_edge[0]}&target={bad.cross_edge[1]}"),
        ("GET", "/api/graph/qk", None, "?path={path}&layer=0&head=0"),
        ("PUT", "/api/graph/state", {"pinned": [a], "supernodes": [{"name": "fz", "members": [a, b]}]}, "?path={path}"),
        ("PUT", "/api/graph/label", {"layer": 0, "feature": 1, "label": "fuzzed"}, "?path={path}"),
        ("POST", "/api/graph/intervene", {"interventions": [{"node": a, "value": 0}], "top": 3}, "?path={path}"),
        ("POST", "/api/jobs", {"prompt": "AB(", "max_feature_nodes": 5}, ""),
        ("GET", f"/api/jobs/{job}", None, ""), ("DELETE", f"/api/jobs/{job}", None, ""),
        ("GET", "/api/circuit", None, "?path={path}"),
        ("PUT", "/api/circuit", {"supernodes": [{"id": "s0", "name": "fz", "members": [a, b]}]}, "?path={path}"),
        ("POST", "/api/circuit/validate", None, "?path={path}"),
    ]
    seen = {(r.path, m) for r in app.routes for m in getattr(r, "methods", ()) if m != "HEAD"}
    assert {(p.replace(job, "{job_id}"), m) for m, p, _, _ in routes} >= {(p, m) for p, m in seen if p != "/static"}
    tally: collections.Counter[tuple[str, int]] = collections.Counter()
    failures = []
    start = time.monotonic()
    try:
        for method, route, valid, query in routes:
            for _ in range(PER_ROUTE):
                status, kind = bad.one(method, route, valid, query)
                tally[(f"{method} {route}", status)] += 1
                if status >= 500 or (kind in ("foreign host", "foreign origin") and status != 403):
                    failures.append(f"{method} {route} {kind} -> {status}")
        wait_for_jobs(app, 60)
    finally:
        server.should_exit = True
    elapsed = time.monotonic() - start
    per_route = collections.Counter()
    for (route, _), n in tally.items():
        per_route[route] += n
    print(f"\n{sum(tally.values())} requests in {elapsed:.1f} s; 2xx per route:",
          {route: sum(n for (r, s), n in tally.items() if r == route and s < 300) for route in per_route})
    assert not failures, failures[:20]
    assert min(per_route.values()) >= PER_ROUTE and len(per_route) == len(routes)
    for method, route, _, _ in routes:  # the valid ones were served: the checks refuse only the bad
        assert sum(n for (r, s), n in tally.items() if r == f"{method} {route}" and s < 300) > 0, route
    assert_only_accepted_writes(app, fuzz_root, before)


def http_post(address: tuple[str, int], target: str, body: dict[str, Any]) -> str:
    """POST `body` as JSON; the answer's text."""
    conn = http.client.HTTPConnection(*address, timeout=30)
    try:
        conn.request("POST", target, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        return conn.getresponse().read().decode()
    finally:
        conn.close()
