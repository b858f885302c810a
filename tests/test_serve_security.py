"""The explorer's security properties, each checked from outside (a real uvicorn server on a socket,
where the request's exact bytes matter) or through the command line:

- it binds 127.0.0.1 unless told otherwise; another interface takes an explicit --host and warns;
- no file outside the served folder is read or written: '..', absolute paths, percent-encoded dots,
  symlinked files and folders leading out get a 4xx and never the file;
- request bodies are limited: over the limit, declared or streamed chunked, is a 413;
- nothing in the package unpickles a file: no pickle, no torch.load without weights_only=True, no
  numpy allow_pickle, no remote code; and a checkpoint carrying code is refused, not run.
"""

from __future__ import annotations

import ast
import http.client
import json
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_one_line_error, run_cli

fastapi = pytest.importorskip("fastapi")
from test_serve import replacement  # noqa: E402

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
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
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
    for host in ["0.0.0.0", "::", "192.168.1.10", "example.org"]:
        code, out, err = run_cli("serve", root, "--host", host, capsys=capsys)
        assert code == 0 and fake_uvicorn[-1]["host"] == host
        assert err.startswith(f"warning: binding {host}:") and len(err.strip().splitlines()) == 1, err
    calls = len(fake_uvicorn)
    for host in ["", "  "]:  # uvicorn would take "" for every interface
        code, _, err = run_cli("serve", root, "--host", host, capsys=capsys)
        assert_one_line_error(code, err, "--host is empty")
    assert len(fake_uvicorn) == calls
    # the Python API and the test/benchmark helper default to loopback too: the socket itself says so
    cltrace.serve.serve(root)
    assert fake_uvicorn[-1]["host"] == "127.0.0.1"
    assert server[0] == "127.0.0.1"


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
    return [
        ("GET", f"/api/graph{q}", None), ("GET", f"/api/graph{q}&full=true", None), ("GET", f"/api/graph/state{q}", None),
        ("GET", f"/api/graph/feature{q}&layer=0&feature=0", None), ("PUT", f"/api/graph/state{q}", b'{"pinned": []}'),
        ("PUT", f"/api/graph/label{q}", label), ("POST", f"/api/graph/intervene{q}", iv),
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
    head = b"PUT " + target + b" HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    code, text = raw_request(server, head % (MAX_BODY + 1), iter([b" " * 4096]))
    assert code == 413 and "request body over" in json.loads(text)["detail"]
    # chunked, no Content-Length: refused once the bytes streamed pass the limit
    chunked = b"PUT " + target + b" HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
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
