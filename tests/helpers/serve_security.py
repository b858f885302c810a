"""The explorer's security tests' fixtures (a served folder and one outside it with a secret, the app
on a real socket), requests sent byte for byte, and every operation that takes a graph path."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cltrace.graph.attribution import attribute
from cltrace.serve.app import create_app, start_in_thread
from helpers.serve import replacement

SECRET = "SECRET-PROMPT-7f3a"  # the prompt of the graph outside the folder: it must never come back
GRAPH = "g.safetensors"


def build_layout(base: Path) -> dict[str, Path]:
    """served/ holds a graph, a symlink to a graph outside and a symlink to the folder outside;
    outside/ holds the secret graph and a secret text file."""
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


def security_fixtures() -> tuple[Any, Any]:
    """A test module's `layout` fixture (`build_layout`) and `server` fixture (the app serving it on a
    real socket), module-scoped: assign both in the module, `layout, server = security_fixtures()`."""

    @pytest.fixture(scope="module")
    def layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
        return build_layout(tmp_path_factory.mktemp("security"))

    @pytest.fixture(scope="module")
    def server(layout: dict[str, Path]) -> Iterator[tuple[str, int]]:
        """The app on a real uvicorn server, started the way `cltrace serve` starts it (default host)."""
        srv, url = start_in_thread(create_app(layout["root"], loader=lambda _metadata: replacement()))
        host, port = srv.servers[0].sockets[0].getsockname()[:2]
        yield host, port
        srv.should_exit = True

    return layout, server


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
