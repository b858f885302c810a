"""The graph explorer's web server: a JSON API (described by its OpenAPI schema at /openapi.json)
and the bundled front end (built from web/ into static/).

Graphs are named by their path relative to the served folder, passed as the ``path`` query
parameter; a path leading outside the folder is refused (403). Errors are JSON ``{"detail": one
line}``: 400 for a request the graph or model cannot satisfy (or a body that is not UTF-8 JSON),
403 for a path outside the folder, 404 for what does not exist, 413 for a body over the size limit
(declared or streamed), 422 for a malformed request, 429 for a new graph while the most allowed are
being computed. No request gets a 5xx: tests/test_serve_fuzz.py
fuzzes every operation from this schema.

Before any route, `cltrace.serve.security.Guard` refuses a foreign Host (403), a missing token where
the server has one (401) and a state-changing request from another page's Origin (403).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from fastapi import Body, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from cltrace.errors import CltraceError
from cltrace.fields import field_bounds, field_default, field_help
from cltrace.graph.config import AttributionConfig
from cltrace.graph.prune import DEFAULT_EDGE_THRESHOLD, DEFAULT_NODE_THRESHOLD
from cltrace.graph.targets import LogitDifference, TargetSpec
from cltrace.replacement.interventions import MAX_VALUE as INTERVENTION_MAX_VALUE
from cltrace.serve import security
from cltrace.serve.attention import add_attention_routes
from cltrace.serve.circuit import add_circuit_routes
from cltrace.serve.jobs import MAX_RUNNING, Jobs, Loader, Models, TooBusy
from cltrace.serve.workspace import NotFound, PathRefused, Workspace

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
#: Largest request body accepted (bytes): saved work and interventions are small.
MAX_BODY = 1 << 20
#: Largest layer or feature index accepted: past int32 no transcoder has features, and tensors
#: compared with a larger Python int overflow.
MAX_INDEX = 2**31 - 1
#: Largest |value| of an intervention: the command line's bound (far past any real activation).
MAX_INTERVENTION = INTERVENTION_MAX_VALUE
BUILD_HINT = "the web app's assets are not built: run `make setup` (or `cd web && npm ci && npm run build`)"


def assets_built() -> bool:
    """Whether the front end has been built into the package's static folder."""
    return (STATIC / "index.html").is_file() and (STATIC / "app.js").is_file()


GraphPath = Annotated[str, Query(min_length=1, max_length=1000, description="The graph file, relative to the served folder.")]
#: A node id such as '3_117_5' (constrained, so that pydantic also refuses text that is not valid Unicode).
NodeId = Annotated[str, Field(min_length=1, max_length=64)]
Index = Annotated[int, Field(ge=0, le=MAX_INDEX)]

# -- request bodies ----------------------------------------------------------------------------------

class SupernodeBody(BaseModel):
    name: str = Field(min_length=1, max_length=100, description="Letters, digits, '_', '.', '-'.")
    members: list[NodeId] = Field(min_length=1, max_length=5000, description="Feature node ids 'layer_feature_pos'.")


class StateBody(BaseModel):
    """The user's work on a graph: pinned nodes (the subgraph) and supernodes."""

    pinned: list[NodeId] = Field(default_factory=list, max_length=10000, description="Node ids.")
    supernodes: list[SupernodeBody] = Field(default_factory=list, max_length=1000)


class LabelBody(BaseModel):
    layer: Index
    feature: Index
    label: str = Field(max_length=500, description="The new label; empty removes it.")


class InterventionItem(BaseModel):
    """One feature node (its feature at its position) or one supernode (all its members)."""

    node: str | None = Field(default=None, max_length=64, description="A feature node id 'layer_feature_pos'.")
    supernode: str | None = Field(default=None, max_length=100, description="A saved supernode's name.")
    mode: Literal["scale", "set"] = "scale"
    value: float = Field(ge=-MAX_INTERVENTION, le=MAX_INTERVENTION, allow_inf_nan=False,
                         description="The factor (scale) or the activation (set).")


class InterventionBody(BaseModel):
    interventions: list[InterventionItem] = Field(min_length=1, max_length=500)
    run_mode: Literal["iterative", "constrained"] = "iterative"
    freeze_attention: bool = False
    top: int = Field(default=10, ge=1, le=50)


#: The most feature nodes a graph built by the server may have: the web app's own resource limit
#: (the library's bound, shared with the command line, is AttributionConfig's).
MAX_FEATURE_NODES_SERVED = 50_000


class NewGraphBody(BaseModel):
    """A new graph; the prompt's length and the cap are checked as `cltrace attribute` checks them
    (the model's context, the memory limit), in the job before any work."""

    prompt: str = Field(min_length=1)
    name: str | None = Field(default=None, max_length=100, description="File name (default: from the prompt).")
    like: str | None = Field(default=None, max_length=1000, description="Use this graph's model and transcoder.")
    max_feature_nodes: int = Field(
        default=field_default(AttributionConfig, "max_feature_nodes"), ge=field_bounds(AttributionConfig, "max_feature_nodes")[0],
        le=MAX_FEATURE_NODES_SERVED, description=field_help(AttributionConfig, "max_feature_nodes"))
    target: str | None = Field(default=None, min_length=1, max_length=100,
                               description="A one-token target to explain (default: the most probable next tokens).")
    versus: str | None = Field(default=None, min_length=1, max_length=100,
                               description="With target: explain logit(target) − logit(versus), a logit difference.")


# -- the app -----------------------------------------------------------------------------------------


def _error(status: int, detail: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """The JSON error response ``{"detail": one line}``. Text the browser sent comes back in some
    messages: characters that cannot be encoded (lone surrogates) become '?' instead of a 500."""
    line = " ".join(str(detail).split()).encode("utf-8", "replace").decode("utf-8")
    return JSONResponse({"detail": line}, status_code=status, headers=headers)


class _LimitBody:
    """ASGI middleware: refuse request bodies over `limit` bytes (413), declared or streamed.

    The body is read in full before the app sees it (it is small), so that a chunked body without a
    Content-Length is measured too and answered 413, rather than failing inside FastAPI's parsing.
    """

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = _error(413, f"request body over {self.limit} bytes: send less")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and not length.strip().isdigit():
            return await _error(400, "the Content-Length header is not a number of bytes: fix the client")(scope, receive, send)
        if length is not None and int(length) > self.limit:
            return await too_big(scope, receive, send)
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending its body: nobody to answer
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.limit:
                return await too_big(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # then what follows the body: the client's disconnect

        await self.app(scope, replay, send)


class _Assets(StaticFiles):
    """The front end's files; while they are not built, a 404 for each (not Starlette's 500 for a
    missing folder: `/` says how to build them)."""

    async def check_config(self) -> None:
        if self.directory is not None and Path(self.directory).is_dir():
            await super().check_config()


def _one_line(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        if err.get("type") == "json_invalid":
            return f"malformed request: the body is not valid JSON ({err.get('ctx', {}).get('error', 'invalid')}): send a JSON object"
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "request"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "malformed request: " + "; ".join(parts)


def _finite(x: float) -> float | None:
    """`x`, or None where it is infinite or NaN (which JSON cannot carry)."""
    return float(x) if math.isfinite(x) else None


def create_app(
    root: str | Path, features: str | Path | None = None, model: str | None = None,
    transcoder: str | Path | None = None, loader: Loader | None = None, host: str = "127.0.0.1",
    port: int | None = None, token: str | None = None, max_running: int = MAX_RUNNING,
    device: str | torch.device | None = "auto",
) -> FastAPI:
    """The explorer app serving the graphs under `root`.

    `features`: a feature store for every graph (default: a matching ``*.db`` in `root`).
    `model`, `transcoder`: what interventions and new graphs run on (default: what each graph's
    metadata names). `loader`: builds the replacement model from a graph's metadata instead (tests).
    `host`, `port`: where it listens (a Host naming them is allowed beside loopback names);
    `token`: required on every request when given. `max_running`: new graphs queued or running at once.
    `device`: where the model and transcoder are loaded, so where interventions and new graphs run.
    """
    workspace = Workspace(root, features)
    models = Models(model, transcoder, loader, device)
    jobs = Jobs(workspace, models, max_running=max_running)
    app = FastAPI(
        title="cltrace graph explorer",
        summary="Attribution graphs, circuits, feature pages, saved work, interventions and new graphs.",
        version="1",
        # FastAPI's /docs and /redoc pages load their scripts from a CDN: the app loads nothing from
        # the internet, so only the schema itself is served (/openapi.json).
        docs_url=None,
        redoc_url=None,
    )
    app.state.workspace, app.state.models, app.state.jobs = workspace, models, jobs
    app.add_middleware(_LimitBody, limit=MAX_BODY)
    app.add_middleware(security.Guard, host=host, port=port, token=token)  # added last: runs first

    _add_error_handlers(app)

    @app.get("/api/info", summary="The served folder, and whether assets and a feature store are there")
    def info() -> dict[str, Any]:
        return {"root": str(workspace.root), "assets": assets_built(), "features": str(features) if features else None}

    @app.get("/api/graphs", summary="Every graph file in the served folder")
    def list_graphs() -> list[dict[str, Any]]:
        return workspace.list_graphs()

    @app.get("/api/graph", summary="A graph pruned at the thresholds: nodes, columnar edges, metadata, saved work")
    def get_graph(
        path: GraphPath,
        node_threshold: float = Query(DEFAULT_NODE_THRESHOLD, ge=0.0, le=1.0),
        edge_threshold: float = Query(DEFAULT_EDGE_THRESHOLD, ge=0.0, le=1.0),
        full: bool = Query(False, description="Every node and edge, unpruned."),
    ) -> Response:
        view = workspace.view(path, node_threshold, edge_threshold, full)
        # json.dumps straight away: FastAPI's encoder walks 100,000-edge lists far more slowly.
        return Response(json.dumps(view, separators=(",", ":")), media_type="application/json")

    @app.get("/api/graph/state", summary="The saved pinned nodes and supernodes of a graph")
    def get_state(path: GraphPath) -> dict[str, Any]:
        return workspace.state(workspace.resolve(path))

    @app.put("/api/graph/state", summary="Save a graph's pinned nodes and supernodes (sidecar JSON, atomic)")
    def put_state(path: GraphPath, body: StateBody = Body()) -> dict[str, Any]:
        return workspace.save_state(path, body.pinned, [s.model_dump() for s in body.supernodes])

    @app.get("/api/graph/feature", summary="A feature's page: contexts, activations, promoted tokens, label")
    def get_feature(path: GraphPath, layer: int = Query(ge=0, le=MAX_INDEX), feature: int = Query(ge=0, le=MAX_INDEX)) -> dict[str, Any]:
        return workspace.feature_page(path, layer, feature)

    @app.put("/api/graph/label", summary="Set or remove a feature's label (feature store, else sidecar)")
    def put_label(path: GraphPath, body: LabelBody = Body()) -> dict[str, Any]:
        where = workspace.set_label(path, body.layer, body.feature, body.label)
        return {"layer": body.layer, "feature": body.feature, "label": body.label.strip(), "saved_in": where}

    @app.post("/api/graph/intervene", summary="Scale or set features and supernodes; top tokens beside the graph's prediction")
    def post_intervene(path: GraphPath, body: InterventionBody = Body()) -> dict[str, Any]:
        return _intervene(workspace, models, path, body)

    _add_job_routes(app, jobs)
    add_attention_routes(app, workspace, models)
    add_circuit_routes(app, workspace, models, jobs)
    _add_page(app)
    return app


def _add_page(app: FastAPI) -> None:
    """The explorer's page and its built assets."""

    @app.get("/", include_in_schema=False)
    def index() -> Response:
        if not assets_built():
            return JSONResponse({"detail": BUILD_HINT}, status_code=503)
        return FileResponse(STATIC / "index.html")

    # StaticFiles serves only files inside STATIC: '..', encoded or not, and symlinks leading out are 404
    app.mount("/static", _Assets(directory=STATIC, check_dir=False), name="static")


def _add_error_handlers(app: FastAPI) -> None:
    """One-line JSON errors with the status each kind of failure deserves."""

    @app.exception_handler(CltraceError)
    async def _cltrace_error(_request: Request, exc: CltraceError) -> JSONResponse:
        # TooBusy is no bad request: the same one succeeds once a job finishes
        status = (403 if isinstance(exc, PathRefused) else 404 if isinstance(exc, NotFound)
                  else 429 if isinstance(exc, TooBusy) else 400)
        return _error(status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _malformed(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, _one_line(exc))

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Request, exc: HTTPException) -> Response:
        if exc.status_code in (204, 304):
            return Response(status_code=exc.status_code, headers=exc.headers)
        detail = str(exc.detail)
        if exc.status_code == 400 and isinstance(exc.__cause__, ValueError):
            # FastAPI's "There was an error parsing the body": bytes that are not UTF-8
            detail = "the request body is not UTF-8 JSON: send a JSON object"
        return _error(exc.status_code, detail, headers=exc.headers)


def _add_job_routes(app: FastAPI, jobs: Jobs) -> None:
    """New graphs computed in the background: start, follow, cancel."""

    @app.post("/api/jobs", status_code=202, summary="Start computing a new graph in the background",
              responses={429: {"description": "The most graphs allowed at once are being computed: try again later"}})
    def post_job(body: NewGraphBody) -> dict[str, Any]:
        if body.versus is not None and body.target is None:
            raise CltraceError("versus compares the target with another token: give the target too, e.g. DA versus DC")
        targets: list[TargetSpec] | None = None
        if body.target is not None:
            targets = [body.target if body.versus is None else LogitDifference(body.target, body.versus)]
        return jobs.submit(body.prompt, body.name, body.like, body.max_feature_nodes, targets).to_dict()

    @app.get("/api/jobs/{job_id}", summary="A new graph's progress")
    def get_job(job_id: Annotated[str, PathParam(min_length=1, max_length=64, description="The id POST /api/jobs gave.")]) -> dict[str, Any]:
        return jobs.get(job_id)

    @app.delete("/api/jobs/{job_id}", summary="Cancel a new graph: a queued one never starts, a running one stops")
    def delete_job(job_id: Annotated[str, PathParam(min_length=1, max_length=64, description="The id POST /api/jobs gave.")]) -> dict[str, Any]:
        return jobs.cancel(job_id)


def _intervene(workspace: Workspace, models: Models, path: str, body: InterventionBody) -> dict[str, Any]:
    """Run the interventions on the graph's prompt; the result beside the graph's prediction."""
    import torch

    from cltrace.graph.graph import NodeKind
    from cltrace.graph.predict import compare_with_graph
    from cltrace.replacement.interventions import Intervention, intervene

    graph_path = workspace.resolve(path)
    graph = workspace.load(graph_path)
    saved = {s["name"]: s["members"] for s in workspace.state(graph_path)["supernodes"]}
    specs: list[Intervention] = []
    for item in body.interventions:
        if (item.node is None) == (item.supernode is None):
            raise CltraceError("each intervention names exactly one of node or supernode")
        if item.supernode is not None and item.supernode not in saved:
            raise NotFound(f"no supernode named {item.supernode!r} in this graph: make it first")
        for nid in [item.node] if item.node is not None else saved[item.supernode]:
            i = graph.find(nid)
            if int(graph.nodes.kind[i]) != int(NodeKind.FEATURE):
                raise CltraceError(f"'{nid}' is not a feature node: only features can be scaled or set")
            value = {"value": item.value} if item.mode == "set" else {"factor": item.value}
            specs.append(Intervention.at(int(graph.nodes.layer[i]), int(graph.nodes.feature[i]), int(graph.nodes.pos[i]), **value))
    ids = graph.metadata.get("input_ids")
    if not isinstance(ids, list) or not ids:
        raise CltraceError("the graph's metadata has no input_ids: rebuild it with `cltrace attribute`")
    with models.lock:
        rm = models.replacement(graph.metadata)
        prompt = torch.tensor(ids, dtype=torch.long)
        result = intervene(rm, prompt, specs, mode=body.run_mode, freeze_attention=body.freeze_attention, top=body.top)
        rows, _, prediction = compare_with_graph(rm, graph, specs, prompt)

    def tokens(items: list) -> list[dict[str, Any]]:
        return [{"token": t.token, "text": t.text, "probability": _finite(t.probability), "logit": _finite(t.logit)}
                for t in items]

    change = result.logit_change
    return {
        "interventions": [str(iv) for iv in specs],
        "before": tokens(result.top_before),
        "after": tokens(result.top_after),
        "logit_change": {str(t.token): _finite(float(change[t.token])) for t in result.top_before + result.top_after},
        "graph_prediction": [
            {"node": r.node_id, "label": r.label, "predicted": _finite(r.predicted), "measured": _finite(r.actual)}
            for r in rows if r.kind == "logit"
        ],
        "features_changed": result.n_changed_features(),
        "not_in_graph": prediction.missing[:50],
    }


def free_port(host: str = "127.0.0.1") -> int:
    """A port of `host` free now (for tests and benchmarks)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def start_in_thread(app: FastAPI, host: str = "127.0.0.1", timeout: float = 20.0, port: int | None = None) -> tuple[Any, str]:
    """Serve `app` from a daemon thread on `port` (default: a free one) of `host` (for tests and
    benchmarks): (the uvicorn server, whose ``should_exit = True`` stops it, and the app's URL)."""
    import threading
    import time

    import uvicorn

    port = free_port(host) if port is None else port
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    threading.Thread(target=server.run, name="cltrace-serve", daemon=True).start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline:
            raise CltraceError(f"the explorer did not start within {timeout:.0f} s")
        time.sleep(0.05)
    return server, f"http://{host}:{port}/"


def serve(root: str | Path, host: str = "127.0.0.1", port: int = 8000, **kwargs: Any) -> None:
    """Run the explorer with uvicorn until interrupted (`kwargs`: those of `create_app`). Beyond
    loopback a token is required (`cltrace.serve.security.access_token` makes one)."""
    import uvicorn

    if not security.is_loopback(host) and not kwargs.get("token"):
        raise CltraceError(f"binding {host} without a token would let anyone on the network in: pass a token")

    app = create_app(root, host=host, port=port, **kwargs)
    uvicorn.run(app, host=host, port=port, log_level="warning")
