"""What one request can make the explorer do: bounded, cancellable jobs, prompts checked as the command line checks them, bodies of limited size."""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from helpers.cli import run_cli

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from helpers.serve import replacement  # noqa: E402
from helpers.serve_security import GRAPH, request, security_fixtures  # noqa: E402
from tqdm import tqdm  # noqa: E402

import cltrace.model  # noqa: E402
from cltrace.errors import CltraceError  # noqa: E402
from cltrace.serve.app import MAX_BODY, create_app, start_in_thread  # noqa: E402

layout, server = security_fixtures()


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


# -- bounded background work -------------------------------------------------------------------------


def test_jobs_are_bounded_cancellable_and_never_half_written(layout: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """N+1 concurrent new graphs: N accepted, the rest 429, the server answering within a second
    throughout; a queued job cancelled never starts, a running one stops and saves nothing; a job
    stopped while saving (as a restart would) leaves no graph file behind, only a hidden temp file."""
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
                p.unlink(missing_ok=True)  # the stopped job may remove its temporary file meanwhile


def test_a_prompt_and_cap_are_checked_as_the_command_line_checks_them(layout: dict[str, Path]) -> None:
    """A prompt past the model's context ends the job with the CLI's own one line, before any work;
    a cap below the config's bound (0) is refused as `--max-feature-nodes -1` is."""
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
    model = replacement().model  # its tokenizer, a fast one, raised TypeError on such text as SmolLM2's did
    monkeypatch.setattr(cltrace.model, "load_model", lambda *_a, **_kw: model)
    argv = os.fsdecode(b"\xff\xfe bad")
    assert argv == "\udcff\udcfe bad"
    code, out, err = run_cli("predict", argv, "--top", "2", capsys=capsys)
    assert code == 0 and "Traceback" not in err, err
    assert err.strip().splitlines() == ["note: the prompt has bytes that are not UTF-8: each is read as U+FFFD, the replacement character"]
    assert out.count("\n") == 3


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
