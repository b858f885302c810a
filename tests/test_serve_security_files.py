"""What the explorer reads and writes: nothing outside the served folder or the static one, and nothing in the package unpickles."""

from __future__ import annotations

import ast
import json
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import torch

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from helpers.serve_security import GRAPH, SECRET, endpoint_requests, request, security_fixtures  # noqa: E402

import cltrace  # noqa: E402
import cltrace.serve.app as serve_app  # noqa: E402
from cltrace.errors import CltraceError  # noqa: E402
from cltrace.serve.app import STATIC, create_app  # noqa: E402
from cltrace.train.distributed import read_checkpoint  # noqa: E402

layout, server = security_fixtures()


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




def test_paths_outside_the_folder_get_a_4xx_and_never_the_file(server: tuple[str, int], layout: dict[str, Path]) -> None:
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
    monkeypatch.setattr(serve_app, "STATIC", tmp_path / "not-built")
    with TestClient(create_app(tmp_path), raise_server_exceptions=False, base_url="http://127.0.0.1") as client:
        assert client.get("/static/app.js").status_code == 404
        assert "make setup" in client.get("/").json()["detail"]


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
    marker = tmp_path / "code-ran"
    torch.save({"config": {"kind": "clt"}, "payload": _RunsCode(marker)}, tmp_path / "state.pt")
    with pytest.raises(CltraceError, match="cannot read checkpoint"):
        read_checkpoint(tmp_path, 0, 1)
    assert not marker.exists()
