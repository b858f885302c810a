"""The explorer's gates, from outside: the interface it binds, its token, and the Host and Origin checks."""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import threading
from pathlib import Path
from typing import Any

import pytest
from helpers.cli import assert_one_line_error, run_cli

fastapi = pytest.importorskip("fastapi")
import uvicorn  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from helpers.serve import replacement  # noqa: E402
from helpers.serve_security import GRAPH, endpoint_requests, request, security_fixtures  # noqa: E402

import cltrace  # noqa: E402
import cltrace.serve.app as serve_app  # noqa: E402
from cltrace.errors import CltraceError  # noqa: E402
from cltrace.serve.app import create_app, free_port, start_in_thread  # noqa: E402
from cltrace.serve.security import url  # noqa: E402

layout, server = security_fixtures()


# -- the interface -----------------------------------------------------------------------------------


@pytest.fixture
def fake_uvicorn(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """uvicorn.run recording its arguments instead of serving; the front end counted as built."""
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
