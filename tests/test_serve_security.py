"""The explorer's security properties, each checked from outside (a real uvicorn server on a socket,
where the request's exact bytes matter) or through the command line:

- it binds 127.0.0.1 unless told otherwise; another interface takes an explicit --host, warns, and
  needs a token (generated and printed with the URL, or given): every request then carries it;
- a request whose Host is not the server's gets 403 before any route runs (DNS rebinding), and one
  that changes state from another page's Origin gets 403 and writes nothing;
- background jobs are bounded (N queued or running, the rest 429), cancellable, and saved atomically;
- no file outside the served folder is read or written: '..', absolute paths, percent-encoded dots,
  symlinked files and folders leading out get a 4xx and never the file;
- request bodies are limited: over the limit, declared or streamed chunked, is a 413;
- nothing in the package unpickles a file: no pickle, no torch.load without weights_only=True, no
  numpy allow_pickle, no remote code; and a checkpoint carrying code is refused, not run.
"""

from __future__ import annotations

import ast
import hashlib
import http.client
import json
import re
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.cli import assert_one_line_error, run_cli

fastapi = pytest.importorskip("fastapi")
from helpers.serve import replacement  # noqa: E402

import cltrace  # noqa: E402
from cltrace.errors import CltraceError  # noqa: E402
from cltrace.graph.attribution import attribute  # noqa: E402
from cltrace.serve.app import MAX_BODY, STATIC, create_app, start_in_thread  # noqa: E402

SECRET = "SECRET-PROMPT-7f3a"  # the prompt of the graph outside the folder: it must never come back
GRAPH = "g.safetensors"


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """served/ holds a graph, a symlink to a graph outside and a symlink to the folder outside;
    outside/ holds the secret graph and a secret text file."""
    base = tmp_path_factory.mktemp("security")
    root, outside = base / "served", base / "outside"
    root.mkdir()
    outside.mkdir()
    rm = replacement()
    attribute(rm, "AB(C", max_feature_nodes=30, progress=False).save(root / GRAPH)
    attribute(rm, SECRET, max_feature_nodes=30, progress=False).save(outside / "secret.safetensors")
    (outside / "secret.txt").write_text(SECRET)
    (root / "link.safetensors").symlink_to(outside / "secret.safetensors")
    (root / "linkdir").symlink_to(outside, target_is_directory=True)
    return {"root": root, "outside": outside}


@pytest.fixture(scope="module")
def server(layout: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """The app on a real uvicorn server, started the way `cltrace serve` starts it (default host)."""
    srv, url = start_in_thread(create_app(layout["root"], loader=lambda _metadata: replacement()))
    host, port = srv.servers[0].sockets[0].getsockname()[:2]
    yield host, port
    srv.should_exit = True


def request(server: tuple[str, int], method: str, target: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, str]:
    """Send `target` byte for byte (no client-side normalisation of '..' or encodings)."""
    conn = http.client.HTTPConnection(*server, timeout=30)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read().decode("utf-8", "replace")
    finally:
        conn.close()


def raw_request(server: tuple[str, int], head: bytes, chunks: Iterable[bytes] = ()) -> tuple[int, str]:
    """Write a request's head then its body chunks on a socket; the server may answer (and stop
    reading) before the body ends, so a failed send is not an error."""
    sock = socket.create_connection(server, timeout=30)
    try:
        try:
            sock.sendall(head)
            for chunk in chunks:
                sock.sendall(chunk)
        except OSError:
            pass
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        return resp.status, resp.read().decode("utf-8", "replace")
    finally:
        sock.close()


# -- the interface -----------------------------------------------------------------------------------


@pytest.fixture
def fake_uvicorn(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """uvicorn.run recording its arguments instead of serving; the front end counted as built."""
    import uvicorn

    import cltrace.serve.app as serve_app

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append({**kw, "app": app}))
    monkeypatch.setattr(serve_app, "assets_built", lambda: True)
    return calls


def test_binds_loopback_by_default_and_warns_for_any_other_interface(
    fake_uvicorn: list[dict[str, Any]], layout: dict[str, Path], server: tuple[str, int],
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = str(layout["root"])
    code, out, err = run_cli("serve", root, capsys=capsys)
    assert code == 0 and fake_uvicorn[-1]["host"] == "127.0.0.1" and err == ""
    for host in ["127.0.0.1", "localhost", "::1", "127.0.0.2"]:  # loopback: no one else can connect
        code, out, err = run_cli("serve", root, "--host", host, capsys=capsys)
        assert code == 0 and fake_uvicorn[-1]["host"] == host and "warning" not in err, (host, err)
        assert "token=" not in out  # no token on loopback unless given
    for host in ["0.0.0.0", "::", "192.168.1.10", "example.org"]:
        code, out, err = run_cli("serve", root, "--host", host, capsys=capsys)
        assert code == 0 and fake_uvicorn[-1]["host"] == host
        assert err.startswith(f"warning: binding {host}:") and len(err.strip().splitlines()) == 1, err
        assert re.search(r"\?token=[\w-]{20,} ", out), out  # a token, generated and printed with the URL
    calls = len(fake_uvicorn)
    for host in ["", "  "]:  # uvicorn would take "" for every interface
        code, _, err = run_cli("serve", root, "--host", host, capsys=capsys)
        assert_one_line_error(code, err, "--host is empty")
    assert len(fake_uvicorn) == calls
    # the Python API and the test/benchmark helper default to loopback too: the socket itself says so
    cltrace.serve.serve(root)
    assert fake_uvicorn[-1]["host"] == "127.0.0.1"
    assert server[0] == "127.0.0.1"


def test_a_token_is_required_beyond_loopback(fake_uvicorn: list[dict[str, Any]], layout: dict[str, Path],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """The app `cltrace serve --host 0.0.0.0` builds refuses every request without the token it
    printed, and serves the one with it (in-process: no interface beyond loopback is bound here)."""
    from fastapi.testclient import TestClient

    root = str(layout["root"])
    code, out, err = run_cli("serve", root, "--host", "0.0.0.0", "--port", "8765", capsys=capsys)
    assert code == 0, err
    printed = re.search(r"at (http://\S+) ", out).group(1)
    token = printed.split("?token=")[1]
    assert printed == f"http://0.0.0.0:8765/?token={token}"
    with TestClient(fake_uvicorn[-1]["app"], base_url="http://192.168.1.10:8765") as client:
        for target in ["/api/graphs", "/api/info", "/openapi.json", f"/api/graph?path={GRAPH}", "/static/app.js"]:
            r = client.get(target)
            assert r.status_code == 401 and "token" in r.json()["detail"], (target, r.text)
        assert client.get("/api/graphs", headers={"Authorization": "token wrong"}).status_code == 401
        assert client.get("/api/graphs", headers={"Authorization": f"token {token}"}).status_code == 200
        r = client.get(f"/api/graphs?token={token}")  # the printed URL's query sets the cookie ...
        assert r.status_code == 200 and "cltrace-token-8765" in r.headers["set-cookie"]
        assert "HttpOnly" in r.headers["set-cookie"] and "SameSite=Strict" in r.headers["set-cookie"]
        assert client.get("/api/graphs").status_code == 200  # ... which the page's own requests then carry
    # a token given is the one required; an empty one beyond loopback is refused before serving
    code, out, err = run_cli("serve", root, "--host", "192.168.1.10", "--token", "s3cret", capsys=capsys)
    assert code == 0 and out.rstrip().endswith("?token=s3cret (Ctrl-C stops)"), out
    calls = len(fake_uvicorn)
    code, out, err = run_cli("serve", root, "--host", "0.0.0.0", "--token", "", capsys=capsys)
    assert_one_line_error(code, err, "--token is empty", "0.0.0.0")
    code, out, err = run_cli("serve", root, "--token", "two words", capsys=capsys)  # it must fit a URL and a cookie
    assert_one_line_error(code, err, "--token holds spaces")
    assert len(fake_uvicorn) == calls
    with pytest.raises(CltraceError, match="without a token"):  # the Python API refuses it too
        cltrace.serve.serve(root, host="0.0.0.0")
    assert len(fake_uvicorn) == calls


def digests(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (symlinks followed where they lead to a file)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def every_route(job_id: str = "nojob") -> list[tuple[str, str, bytes | None]]:
    """One well-formed request to each route of the app (and its pages and schema)."""
    return [("GET", "/", None), ("GET", "/static/app.js", None), ("GET", "/openapi.json", None),
            ("GET", "/api/info", None), ("GET", "/api/graphs", None), ("GET", f"/api/jobs/{job_id}", None),
            ("POST", "/api/jobs", json.dumps({"prompt": "AB", "max_feature_nodes": 5}).encode()),
            ("DELETE", f"/api/jobs/{job_id}", None),
            ("GET", f"/api/graph/heads?path={GRAPH}&source=E_0_0&target=E_0_1", None),
            ("GET", f"/api/graph/qk?path={GRAPH}&layer=0&head=0", None), *endpoint_requests(GRAPH)]


def test_the_routes_cover_the_app() -> None:
    """`every_route` names each route the app has, so that a new one cannot skip the checks below."""
    app = create_app(".")
    routes = {(m, r.path) for r in app.routes for m in getattr(r, "methods", ()) if m != "HEAD"}
    sent = {(m, t.split("?")[0]) for m, t, _ in every_route("{job_id}")}
    assert {(m, p) for m, p in routes if not p.startswith("/static")} <= sent | {("GET", "/static")}, routes - sent


FOREIGN_HOSTS = ["evil.example", "evil.example:80", "127.0.0.1.evil.example", "localhost.evil.example:8000",
                 "", "127.0.0.2", "[::2]:80", "0.0.0.0", "LOCALHOST:abc", "localhost:80:80", "évil"]


def test_a_foreign_host_gets_403_on_every_route_before_it_runs(server: tuple[str, int], layout: dict[str, Path]) -> None:
    before = digests(layout["root"].parent)
    port = server[1]
    for host in FOREIGN_HOSTS:
        for method, target, body in every_route():
            headers = {"Host": host, "Content-Type": "application/json"}
            code, text = request(server, method, target, body, headers)
            assert code == 403, (host, method, target, code, text)
            detail = json.loads(text)["detail"]
            assert "is not this server's" in detail and len(detail.splitlines()) == 1
    assert digests(layout["root"].parent) == before  # no job started, nothing written
    for host in ["localhost", f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", f"LocalHost:{port}"]:
        code, text = request(server, "GET", "/api/graphs", headers={"Host": host})
        assert code == 200, (host, text)


FOREIGN_ORIGINS = ["http://evil.example", "null", "https://127.0.0.1:{port}", "http://127.0.0.1:1",
                   "http://localhost:{port}", "http://127.0.0.1:{port}.evil.example", "file://"]


def test_a_foreign_origin_cannot_change_anything(layout: dict[str, Path]) -> None:
    """Each state-changing route from another page's Origin: 403, no file changed, no job started
    or cancelled; from the server's own origin or with no Origin (curl, the CLI) it works."""
    gate = threading.Event()
    srv, url = start_in_thread(create_app(layout["root"], loader=lambda _m: gate.wait(60) and replacement()))
    server = srv.servers[0].sockets[0].getsockname()[:2]
    host = f"127.0.0.1:{server[1]}"
    jobs = srv.config.app.state.jobs
    try:
        own = {"Content-Type": "application/json", "Host": host, "Origin": f"http://{host}"}
        code, text = request(server, "POST", "/api/jobs", json.dumps({"prompt": "AB", "max_feature_nodes": 5}).encode(), own)
        assert code == 202, text
        job_id = json.loads(text)["id"]
        writes = [(m, t, b) for m, t, b in every_route(job_id) if m in ("PUT", "POST", "DELETE")]
        assert len(writes) == 7
        before = digests(layout["root"].parent)
        for origin in FOREIGN_ORIGINS:
            for method, target, body in writes:
                headers = {"Content-Type": "application/json", "Host": host, "Origin": origin.format(port=server[1])}
                code, text = request(server, method, target, body, headers)
                assert code == 403 and "not this server's own page" in json.loads(text)["detail"], (origin, target, code)
        assert digests(layout["root"].parent) == before
        assert list(jobs._jobs) == [job_id] and jobs._jobs[job_id].status in ("queued", "running")
        # text/plain (what a form may send without asking): refused as today, nothing written
        code, text = request(server, "PUT", f"/api/graph/state?path={GRAPH}", b'{"pinned": []}',
                             {"Content-Type": "text/plain", "Host": host})
        assert code == 422 and digests(layout["root"].parent) == before, text
        # the server's own page, and no Origin at all, are served
        for headers in (own, {"Content-Type": "application/json"}):
            code, text = request(server, "PUT", f"/api/graph/label?path={GRAPH}",
                                 json.dumps({"layer": 0, "feature": 1, "label": "mine"}).encode(), headers)
            assert code == 200, text
        code, text = request(server, "DELETE", f"/api/jobs/{job_id}", None, own)
        assert code == 200 and json.loads(text)["status"] in ("cancelled", "cancelling"), text
    finally:
        gate.set()
        srv.should_exit = True
        (layout["root"] / "g.explorer.json").unlink(missing_ok=True)


def test_an_explicit_token_is_enforced_on_loopback_too(layout: dict[str, Path]) -> None:
    """The token path of a server beyond loopback, on a real socket: `--token` on loopback enforces it."""
    from cltrace.serve.app import free_port
    from cltrace.serve.security import url

    port = free_port()
    srv, _ = start_in_thread(create_app(layout["root"], port=port, token="tok/en+1"), port=port)
    server = ("127.0.0.1", port)
    try:
        for method, target, body in every_route():
            code, text = request(server, method, target, body, {"Content-Type": "application/json"})
            assert code == 401, (method, target, code, text)
        code, text = request(server, "GET", "/api/graphs", headers={"Host": "evil.example"})
        assert code == 403  # the Host is checked first: no token check tells a foreign page anything
        printed = url("127.0.0.1", port, "tok/en+1")
        assert printed.endswith("?token=tok%2Fen%2B1")
        conn = http.client.HTTPConnection(*server, timeout=30)
        conn.request("GET", printed.removeprefix(f"http://127.0.0.1:{port}"))
        resp = conn.getresponse()
        resp.read()
        assert resp.status in (200, 503) and resp.getheader("set-cookie").startswith(f"cltrace-token-{port}=")
        cookie = resp.getheader("set-cookie").split(";")[0]
        conn.close()
        assert request(server, "GET", "/api/graphs", headers={"Cookie": cookie})[0] == 200
        assert request(server, "GET", "/api/graphs", headers={"Cookie": f"cltrace-token-{port + 1}=tok/en+1"})[0] == 401
        assert request(server, "GET", "/api/graphs", headers={"Authorization": "token tok/en+1"})[0] == 200
    finally:
        srv.should_exit = True


# -- bounded background work -------------------------------------------------------------------------


def test_jobs_are_bounded_cancellable_and_never_half_written(layout: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """N+1 concurrent new graphs: N accepted, the rest 429, the server answering within a second
    throughout; a queued job cancelled never starts, a running one stops and saves nothing; a job
    stopped while saving (as a restart would) leaves no graph file behind, only a hidden temp file."""
    import os

    from tqdm import tqdm

    n = 3
    gate = threading.Event()
    root = layout["root"]
    srv, _ = start_in_thread(create_app(root, loader=lambda _m: gate.wait(60) and replacement(), max_running=n))
    server = srv.servers[0].sockets[0].getsockname()[:2]
    jobs = srv.config.app.state.jobs
    graphs_before = sorted(p.name for p in root.glob("*.safetensors"))
    post = json.dumps({"prompt": "AB(C", "max_feature_nodes": 5}).encode()
    answers: list[tuple[int, str]] = []
    try:
        threads = [threading.Thread(target=lambda: answers.append(
            request(server, "POST", "/api/jobs", post, {"Content-Type": "application/json"}))) for _ in range(n + 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        codes = sorted(code for code, _ in answers)
        assert codes == [202] * n + [429], answers
        assert f"{n} graphs or circuits are already being computed" in next(t for c, t in answers if c == 429)
        t0 = time.monotonic()  # one job holds the model (its loader waits), the others queue behind it
        code, _ = request(server, "GET", "/api/graphs")
        assert code == 200 and time.monotonic() - t0 < 1.0
        ids = [json.loads(t)["id"] for c, t in answers if c == 202]
        time.sleep(0.2)
        running = [i for i in ids if jobs._jobs[i].status == "running"]
        queued = [i for i in ids if jobs._jobs[i].status == "queued"]
        assert len(running) == 1 and len(queued) == n - 1
        # cancelling a queued job frees its place at once: one more is accepted
        code, text = request(server, "DELETE", f"/api/jobs/{queued[0]}")
        assert code == 200 and json.loads(text)["status"] == "cancelled", text
        code, text = request(server, "POST", "/api/jobs", post, {"Content-Type": "application/json"})
        assert code == 202, text
        ids.append(json.loads(text)["id"])
        assert request(server, "POST", "/api/jobs", post, {"Content-Type": "application/json"})[0] == 429
        # cancelling the running job: it stops before attributing, then the rest run
        code, text = request(server, "DELETE", f"/api/jobs/{running[0]}")
        assert code == 200 and json.loads(text)["status"] == "cancelling", text
        gate.set()
        deadline = time.monotonic() + 60
        while any(jobs._jobs[i].status in ("queued", "running", "cancelling") for i in ids) and time.monotonic() < deadline:
            time.sleep(0.05)
        status = {i: json.loads(request(server, "GET", f"/api/jobs/{i}")[1]) for i in ids}
        assert [status[i]["status"] for i in (queued[0], running[0])] == ["cancelled", "cancelled"]
        assert status[running[0]]["graph"] is None and status[queued[0]]["stage"] == "cancelled"
        done = [s for s in status.values() if s["status"] == "done"]
        assert len(done) == n - 1, status
        # a job cancelled mid-attribution stops at its next batch of rows
        slow = tqdm.update

        def slow_update(self: Any, n: float | None = 1) -> Any:
            time.sleep(0.3)
            return slow(self, n)

        monkeypatch.setattr(tqdm, "update", slow_update)
        code, text = request(server, "POST", "/api/jobs", json.dumps({"prompt": "AB(C" * 8, "name": "cut"}).encode(),
                             {"Content-Type": "application/json"})
        job_id = json.loads(text)["id"]
        while jobs._jobs[job_id].stage != "attributing" and time.monotonic() < deadline:
            time.sleep(0.01)
        t0 = time.monotonic()
        assert json.loads(request(server, "DELETE", f"/api/jobs/{job_id}")[1])["status"] == "cancelling"
        while jobs._jobs[job_id].status == "cancelling" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert jobs._jobs[job_id].status == "cancelled" and time.monotonic() - t0 < 5
        assert not (root / "cut.safetensors").exists()
        monkeypatch.undo()
        # a job stopped while saving, just before its rename, as a restart would stop it
        replace, holding, never = os.replace, threading.Event(), threading.Event()

        def stuck(src: Any, dst: Any) -> None:
            if threading.current_thread().name.startswith("graph-"):
                holding.set()
                never.wait(30)
                raise CltraceError("stopped here, as a restart would stop it")
            replace(src, dst)

        monkeypatch.setattr(os, "replace", stuck)
        code, text = request(server, "POST", "/api/jobs", json.dumps({"prompt": "AB", "name": "torn"}).encode(),
                             {"Content-Type": "application/json"})
        assert code == 202 and holding.wait(30)
        assert not (root / "torn.safetensors").exists()
        temps = [p.name for p in root.iterdir() if p.name.startswith(".torn.safetensors.")]
        assert temps and all(p.endswith(".tmp") for p in temps)
        restarted = create_app(root)  # what a restarted server lists: no torn graph
        listed = [g["path"] for g in restarted.state.workspace.list_graphs()]
        assert "torn.safetensors" not in listed and not any(p.startswith(".") for p in listed)
        never.set()
    finally:
        gate.set()
        srv.should_exit = True
        for p in root.iterdir():
            if p.name not in graphs_before and (p.suffix == ".safetensors" or p.name.endswith(".tmp")) and p.is_file():
                p.unlink()


def test_a_prompt_and_cap_are_checked_as_the_command_line_checks_them(layout: dict[str, Path]) -> None:
    """A prompt past the model's context ends the job with the CLI's own one line, before any work;
    a cap below the config's bound (0) is refused as `--max-feature-nodes -1` is."""
    from fastapi.testclient import TestClient

    rm = replacement()
    too_long = "A" * (rm.model.max_context + 5)
    with pytest.raises(CltraceError) as cli_error:
        rm.input_ids(too_long)
    with TestClient(create_app(layout["root"], loader=lambda _m: rm), base_url="http://127.0.0.1") as client:
        r = client.post("/api/jobs", json={"prompt": too_long, "name": "long"})
        assert r.status_code == 202, r.text
        deadline = time.monotonic() + 30
        job = r.json()
        while job["status"] not in ("done", "error") and time.monotonic() < deadline:
            time.sleep(0.05)
            job = client.get(f"/api/jobs/{job['id']}").json()
        assert job["status"] == "error" and job["error"] == str(cli_error.value), job
        assert not (layout["root"] / "long.safetensors").exists()
        r = client.post("/api/jobs", json={"prompt": "AB", "max_feature_nodes": -1})
        assert r.status_code == 422 and "max_feature_nodes" in r.json()["detail"]


def test_a_prompt_with_bytes_that_are_not_utf8_is_read_with_a_note(monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """`cltrace predict "$(printf '\\xff\\xfe bad')"`: Python hands such bytes to the program as lone
    surrogates (os.fsdecode, surrogateescape), which the tokenizer refused with a traceback."""
    import os

    import cltrace.model

    model = replacement().model  # its tokenizer, a fast one, raised TypeError on such text as SmolLM2's did
    monkeypatch.setattr(cltrace.model, "load_model", lambda *_a, **_kw: model)
    argv = os.fsdecode(b"\xff\xfe bad")
    assert argv == "\udcff\udcfe bad"
    code, out, err = run_cli("predict", argv, "--top", "2", capsys=capsys)
    assert code == 0 and "Traceback" not in err, err
    assert err.strip().splitlines() == ["note: the prompt has bytes that are not UTF-8: each is read as U+FFFD, the replacement character"]
    assert out.count("\n") == 3


# -- files outside the folder ------------------------------------------------------------------------

TRAVERSALS = [
    "../outside/secret.safetensors", "..%2Foutside%2Fsecret.safetensors", "%2e%2e/outside/secret.safetensors",
    "%2E%2E%2Foutside%2Fsecret.safetensors", "./../outside/secret.safetensors", "linkdir/../../outside/secret.safetensors",
    "link.safetensors", "linkdir/secret.safetensors", "linkdir%2Fsecret.safetensors", "linkdir",
]
NOT_FOUND = [  # names that decode to no file inside (and nothing outside is looked at)
    "%252e%252e/outside/secret.safetensors", "..%5Coutside%5Csecret.safetensors", "....//outside/secret.safetensors",
    "~/secret.safetensors", "a" * 300,
]


def endpoint_requests(path: str) -> list[tuple[str, str, bytes | None]]:
    """Every operation that takes a graph path, with `path` (already URL-encoded) in its query or body."""
    q = f"?path={path}"
    iv = json.dumps({"interventions": [{"node": "0_0_1", "value": 0}]}).encode()
    label = json.dumps({"layer": 0, "feature": 0, "label": "x"}).encode()
    circuit = json.dumps({"supernodes": [{"id": "s0", "name": "x", "members": ["0_0_1"]}]}).encode()
    return [
        ("GET", f"/api/graph{q}", None), ("GET", f"/api/graph{q}&full=true", None), ("GET", f"/api/graph/state{q}", None),
        ("GET", f"/api/graph/feature{q}&layer=0&feature=0", None), ("PUT", f"/api/graph/state{q}", b'{"pinned": []}'),
        ("PUT", f"/api/graph/label{q}", label), ("POST", f"/api/graph/intervene{q}", iv), ("GET", f"/api/circuit{q}", None),
        ("PUT", f"/api/circuit{q}", circuit), ("POST", f"/api/circuit/validate{q}", None),
    ]


def test_paths_outside_the_folder_get_a_4xx_and_never_the_file(server: tuple[str, int], layout: dict[str, Path]) -> None:
    from urllib.parse import quote

    before = sorted(p.name for p in layout["outside"].iterdir())
    cases = [(p, 403) for p in TRAVERSALS] + [(p, 404) for p in NOT_FOUND]
    cases += [(quote(str(layout["outside"] / "secret.safetensors")), 403), ("%2Fetc%2Fpasswd", 403), ("/etc/passwd", 403)]
    cases += [(f"{GRAPH}%00", 400), ("%00..%2Fsecret.safetensors", 400)]
    for path, status in cases:
        for method, target, body in endpoint_requests(path):
            headers = {"Content-Type": "application/json"} if body is not None else {}
            code, text = request(server, method, target, body, headers)
            assert code == status, (target, code, text)
            assert SECRET not in text and "root:" not in text, target
            assert len(json.loads(text)["detail"].splitlines()) == 1
        # a new graph cannot borrow the model of a graph outside either
        body = json.dumps({"prompt": "AB", "like": path}).encode()
        code, text = request(server, "POST", "/api/jobs", body, {"Content-Type": "application/json"})
        assert 400 <= code < 500 and SECRET not in text, (path, code, text)
    # nothing was written outside (no sidecar of saved work or labels beside the secret graph)
    assert sorted(p.name for p in layout["outside"].iterdir()) == before
    # the list holds the graph inside only: neither the symlinked file nor the symlinked folder
    code, text = request(server, "GET", "/api/graphs")
    assert code == 200 and [g["path"] for g in json.loads(text)] == [GRAPH] and SECRET not in text
    # and the graph inside is served: the refusals above are about where, not about every file
    code, text = request(server, "GET", f"/api/graph?path={GRAPH}")
    assert code == 200 and json.loads(text)["metadata"]["prompt"] == "AB(C"


def test_new_graph_names_stay_inside_the_folder(server: tuple[str, int], layout: dict[str, Path]) -> None:
    import time

    body = json.dumps({"prompt": "AB", "name": "../../outside/evil", "max_feature_nodes": 5}).encode()
    code, text = request(server, "POST", "/api/jobs", body, {"Content-Type": "application/json"})
    assert code == 202, text
    job = json.loads(text)
    deadline = time.monotonic() + 60
    while job["status"] not in ("done", "error") and time.monotonic() < deadline:
        time.sleep(0.1)
        job = json.loads(request(server, "GET", f"/api/jobs/{job['id']}")[1])
    assert job["status"] == "done", job
    assert (layout["root"] / job["graph"]).is_file() and "/" not in job["graph"] and ".." not in job["graph"]
    assert not any(p.name.startswith("evil") for p in layout["outside"].iterdir())
    (layout["root"] / job["graph"]).unlink()


def test_static_files_stay_in_the_static_folder(server: tuple[str, int], monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    """The front end's folder sits in the package: '..' from it reaches the server's source code."""
    source = (STATIC.parent / "app.py").read_text()
    marker = "def create_app("
    assert marker in source
    for target in ["/static/../app.py", "/static/%2e%2e/app.py", "/static/%2E%2E%2Fapp.py", "/static/..%2fapp.py",
                   "/static/../../../../../../etc/passwd", "/static/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
                   "/static//etc/passwd", "/static/%2Fetc%2Fpasswd", "/static/..%5capp.py", "/../app.py"]:
        code, text = request(server, "GET", target)
        assert 400 <= code < 500 and marker not in text and "root:" not in text, (target, code)
    # with the front end not built, its files are a 404, not a server error
    import cltrace.serve.app as serve_app

    monkeypatch.setattr(serve_app, "STATIC", tmp_path / "not-built")
    from fastapi.testclient import TestClient

    with TestClient(create_app(tmp_path), raise_server_exceptions=False, base_url="http://127.0.0.1") as client:
        assert client.get("/static/app.js").status_code == 404
        assert "make setup" in client.get("/").json()["detail"]


# -- request sizes -----------------------------------------------------------------------------------


def test_oversized_bodies_get_413_declared_or_chunked(server: tuple[str, int], layout: dict[str, Path]) -> None:
    target = f"/api/graph/state?path={GRAPH}".encode()
    sidecar = layout["root"] / "g.explorer.json"
    # declared: refused from the header, before the body is read
    head = b"PUT " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    code, text = raw_request(server, head % (MAX_BODY + 1), iter([b" " * 4096]))
    assert code == 413 and "request body over" in json.loads(text)["detail"]
    # chunked, no Content-Length: refused once the bytes streamed pass the limit
    chunked = b"PUT " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    piece = b" " * 65536
    chunks = iter([b"%x\r\n%s\r\n" % (len(piece), piece)] * (MAX_BODY // len(piece) + 2) + [b"0\r\n\r\n"])
    code, text = raw_request(server, chunked, chunks)
    assert code == 413 and "request body over" in json.loads(text)["detail"]
    assert not sidecar.exists()
    # just under the limit, chunked or not, is read and saved: the limit is where it says
    body = b'{"pinned": []}' + b" " * (MAX_BODY - 20)
    code, text = raw_request(server, head % len(body), iter([body]))
    assert code == 200 and json.loads(text) == {"pinned": [], "supernodes": []}
    code, text = raw_request(server, chunked, iter([b"%x\r\n%s\r\n" % (len(body), body), b"0\r\n\r\n"]))
    assert code == 200 and sidecar.is_file()
    sidecar.unlink()


# -- no unpickling -----------------------------------------------------------------------------------

UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def unsafe_loads(source: str) -> list[str]:
    """Where `source` could run code from a file it reads: a pickle-family import, torch.load
    without weights_only=True, weights_only=False, allow_pickle=True, trust_remote_code=True,
    yaml.load / unsafe_load / full_load, pandas read_pickle, torch.jit.load."""
    found = []
    for node in ast.walk(ast.parse(source)):
        where = f"line {getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"{where}: from {node.module} import")
        elif isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            kw = {k.arg: k.value for k in node.keywords if k.arg}
            const = {k: v.value for k, v in kw.items() if isinstance(v, ast.Constant)}
            if name.endswith("torch.load") or name == "load" and "weights_only" in kw:
                if const.get("weights_only") is not True:
                    found.append(f"{where}: {name} without weights_only=True")
            if const.get("weights_only") is False or const.get("allow_pickle") is True or const.get("trust_remote_code") is True:
                found.append(f"{where}: {name} with {', '.join(k for k in ('weights_only', 'allow_pickle', 'trust_remote_code') if k in const)}")
            if name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all") \
                    or name.endswith(("read_pickle", "jit.load", "torch.package.PackageImporter")):
                found.append(f"{where}: {name}")
    return found


def test_the_scan_finds_each_unsafe_load() -> None:
    """The scanner itself: each way of unpickling is caught, and safe loading is not flagged."""
    bad = [
        "import pickle", "import cloudpickle as cp", "from dill import loads", "from joblib import load",
        "torch.load(p)", "torch.load(p, weights_only=False)", "torch.load(p, map_location='cpu', weights_only=flag)",
        "np.load(p, allow_pickle=True)", "numpy.load(p, allow_pickle=True)", "yaml.load(text)", "yaml.unsafe_load(text)",
        "AutoModel.from_pretrained(p, trust_remote_code=True)", "pd.read_pickle(p)", "torch.jit.load(p)",
    ]
    for line in bad:
        assert unsafe_loads(line), line
    good = ["torch.load(p, weights_only=True, mmap=True)", "np.load(p)", "yaml.safe_load(text)", "json.loads(text)",
            "safetensors.torch.load_file(p)", "AutoModel.from_pretrained(p, local_files_only=True)"]
    for line in good:
        assert not unsafe_loads(line), line


def test_the_package_never_unpickles() -> None:
    package = Path(cltrace.__file__).parent
    files = sorted(package.rglob("*.py"))
    assert len(files) > 20
    found = [f"{f.relative_to(package)} {hit}" for f in files for hit in unsafe_loads(f.read_text(encoding="utf-8"))]
    assert not found, found


class _RunsCode:
    """An object whose unpickling touches a file: proof that the loader ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_a_checkpoint_carrying_code_is_refused_not_run(tmp_path: Path) -> None:
    from cltrace.train.distributed import read_checkpoint

    marker = tmp_path / "code-ran"
    torch.save({"config": {"kind": "clt"}, "payload": _RunsCode(marker)}, tmp_path / "state.pt")
    with pytest.raises(CltraceError, match="cannot read checkpoint"):
        read_checkpoint(tmp_path, 0, 1)
    assert not marker.exists()
