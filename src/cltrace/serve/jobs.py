"""The slow work behind the graph explorer: the model and transcoder a graph names (loaded once, on
first use), interventions on them, and background jobs with progress: new graphs, and circuits
rebuilt and re-validated (`Jobs.submit_work`, used by `cltrace.serve.circuit`).

Jobs are bounded: at most `max_running` are queued or running at once (one more is refused,
HTTP 429). A new graph is checked by the command line's own rules (`AttributionConfig`: the feature
cap, the prompt against the model's context and the memory limit, before any work); every job can
be cancelled, and saves atomically, so a server stopped mid-job leaves no half-written file.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from cltrace.device import resolve_device
from cltrace.errors import CltraceError
from cltrace.graph.attribution import AttributionConfig, attribute, resolve_config
from cltrace.graph.prune import prune
from cltrace.graph.targets import TargetSpec
from cltrace.serve.workspace import NotFound, Workspace

log = logging.getLogger(__name__)

#: New graphs queued or running at once by default; one more is refused (HTTP 429) until one ends.
MAX_RUNNING = 4
#: A job's statuses while it holds a place in the queue.
ACTIVE = ("queued", "running", "cancelling")


class TooBusy(CltraceError):
    """Too many graphs are being computed to start another now (HTTP 429: try again later)."""


class Cancelled(CltraceError):
    """The job was cancelled (raised inside its thread to stop the attribution)."""

#: Builds the replacement model for a graph's metadata (tests pass their own tiny one).
Loader = Callable[[dict[str, Any]], Any]


class Models:
    """The replacement models graphs name, loaded lazily and kept.

    The model comes from ``--model`` or else the graph's ``model`` metadata; the transcoder from
    ``--transcoder`` or else the graph's ``transcoder_path`` metadata (written by `cltrace
    attribute` and by the explorer's "new graph"). Both go to `device` ("auto", "cpu", "cuda", ...),
    where interventions and new graphs run. One computation runs at a time (`lock`): two would only
    slow each other down on a small machine, and they share the model's hooks.
    """

    def __init__(self, model: str | None = None, transcoder: str | Path | None = None, loader: Loader | None = None,
                 device: str | torch.device | None = "auto") -> None:
        self.model = model
        self.device = resolve_device(device)  # a device this machine lacks is refused when the server starts
        self.transcoder = None if transcoder is None else Path(transcoder)
        self.loader = loader
        self.lock = threading.Lock()
        self._cache: dict[tuple[str | None, str], Any] = {}

    def transcoder_path(self, metadata: dict[str, Any]) -> Path | None:
        """The transcoder directory for a graph with this metadata, if known."""
        if self.transcoder is not None:
            return self.transcoder.resolve()
        return Path(metadata["transcoder_path"]) if metadata.get("transcoder_path") else None

    def replacement(self, metadata: dict[str, Any]) -> Any:
        """The ReplacementModel for a graph with this metadata (loading it the first time)."""
        if self.loader is not None:
            return self.loader(metadata)
        from cltrace.model.load import DEFAULT_MODEL

        tc_path = self.transcoder_path(metadata)
        if tc_path is None:
            raise CltraceError(
                "this graph does not say which transcoder built it: restart with `cltrace serve --transcoder DIR`"
            )
        name = self.model or metadata.get("model")
        name = None if name in (None, DEFAULT_MODEL, "default") else str(name)
        key = (name, str(tc_path))
        if key not in self._cache:
            from cltrace.model import load_model
            from cltrace.replacement import ReplacementModel
            from cltrace.transcoder import load_transcoder

            log.info("loading model %s and transcoder %s", name or DEFAULT_MODEL, tc_path)
            tc = load_transcoder(tc_path, device=self.device)
            self._cache[key] = ReplacementModel(load_model(name, device=self.device), tc)
        return self._cache[key]


@dataclass
class Job:
    """A background job: a new graph being computed, or a circuit being re-validated."""

    id: str
    prompt: str
    kind: str = "graph"  # graph: a new graph | circuit: a circuit rebuilt and re-validated
    status: str = "queued"  # queued | running | cancelling | cancelled | done | error
    stage: str = "waiting"  # waiting | loading model | attributing | scoring | saving | done | cancelled
    done: int = 0  # rows of the attribution computed so far
    total: int = 0  # rows in all (0 while unknown)
    error: str | None = None
    graph: str | None = None  # the graph's path in the served folder (a new graph's once saved)
    started: float = field(default_factory=time.time)
    cancel: threading.Event = field(default_factory=threading.Event, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "cancel"}
        out["elapsed_s"] = round(time.time() - self.started, 2)
        return out


def _open_attribution_bar() -> Any:
    """The running attribution's progress bar, if one is open.

    `cltrace.graph.attribution` reports progress only through its tqdm bar; tqdm keeps every open
    bar in a class-level set, and `Models.lock` lets one attribution run at a time, so the bar
    named "attribution" is this job's.
    """
    from tqdm import tqdm

    return next((bar for bar in list(tqdm._instances) if getattr(bar, "desc", "") == "attribution"), None)


def _attribution_bar() -> tuple[int, int] | None:
    """(n, total) of the running attribution's progress bar, if one is open."""
    bar = _open_attribution_bar()
    return None if bar is None else (int(bar.n), int(bar.total or 0))


def _stop_attribution() -> None:
    """Make the running attribution stop at its next batch of rows: the bar's next update raises
    `Cancelled` in the job's thread (the attribution frees what it holds as any error does)."""
    bar = _open_attribution_bar()
    if bar is not None:
        def stop(*_args: Any, **_kwargs: Any) -> None:
            raise Cancelled("cancelled")

        bar.update = stop


class Jobs:
    """New graphs computed in background threads, polled by id; at most `max_running` queued or
    running at once, and the `max_jobs` most recent remembered."""

    def __init__(self, workspace: Workspace, models: Models, max_jobs: int = 100, max_running: int = MAX_RUNNING) -> None:
        if max_running < 1:
            raise CltraceError(f"at most {max_running} jobs at once would refuse every new graph: allow 1 or more")
        self.workspace = workspace
        self.models = models
        self.max_jobs = max_jobs
        self.max_running = max_running
        self._jobs: dict[str, Job] = {}
        self._outputs: dict[str, Path] = {}  # job id -> the file it will write, until it has
        self._lock = threading.Lock()

    def submit(self, prompt: str, name: str | None = None, like: str | None = None,
               max_feature_nodes: int | None = None, targets: list[TargetSpec] | None = None) -> Job:
        """Start computing the graph of `prompt` with the model and transcoder of graph `like` (a
        path in the served folder; default: the server's --model/--transcoder); `targets` as
        `attribute` takes them (default: the most probable next tokens)."""
        if not prompt.strip():
            raise CltraceError("the prompt is empty: type the text whose next token to explain")
        config = resolve_config(None, max_feature_nodes=max_feature_nodes, progress=True)  # the CLI's checks
        metadata = dict(self.workspace.graph(like).metadata) if like else {}
        job = Job(id=uuid.uuid4().hex[:12], prompt=prompt)
        with self._lock:
            self._admit(job)
            # a name unused on disk and by the jobs not yet saved: two jobs never write one file
            out = self.workspace.new_graph_path(name or prompt, taken=set(self._outputs.values()))
            self._outputs[job.id] = out
        threading.Thread(
            target=self._guarded, args=(job, lambda: self._attribute(job, metadata, out, config, targets)), name=f"graph-{job.id}",
            daemon=True,
        ).start()
        return job

    def submit_work(self, kind: str, prompt: str, graph: str, work: Callable[[Job, Callable[[str], None]], None]) -> Job:
        """Run `work(job, step)` in a background thread, holding the models' lock; it calls
        `step(stage)` as it goes (which stops it there once the job is cancelled) and saves its
        result itself. One job of a `kind` per graph at a time; TooBusy beyond that or the bound."""
        job = Job(id=uuid.uuid4().hex[:12], prompt=prompt, kind=kind, graph=graph)
        with self._lock:
            if any(j.kind == kind and j.graph == graph and j.status in ACTIVE for j in self._jobs.values()):
                raise TooBusy(f"a {kind} job on '{graph}' is already running: wait for it to finish")
            self._admit(job)

        def body() -> None:
            with self.models.lock:
                with self._lock:  # not between a cancel's look at the status and its change
                    self._step(job, "waiting")
                    job.status = "running"
                work(job, lambda stage: self._step(job, stage))

        threading.Thread(target=self._guarded, args=(job, body), name=f"{kind}-{job.id}", daemon=True).start()
        return job

    def _admit(self, job: Job) -> None:
        """Queue `job` (the caller holds `_lock`), or TooBusy at the bound; old finished jobs are forgotten."""
        active = sum(j.status in ACTIVE for j in self._jobs.values())
        if active >= self.max_running:
            raise TooBusy(f"{self.max_running} graphs or circuits are already being computed: wait for one to finish, then try again")
        self._jobs[job.id] = job
        while len(self._jobs) > self.max_jobs:  # forget the oldest finished jobs
            oldest = next((k for k, j in self._jobs.items() if j.status not in ACTIVE), None)
            if oldest is None:
                break
            del self._jobs[oldest]

    def get(self, job_id: str) -> dict[str, Any]:
        """A job's progress (``to_dict``); NotFound for an unknown id."""
        job = self._find(job_id)
        if job.status == "running" and job.stage == "attributing":
            bar = _attribution_bar()
            if bar is not None:
                job.done, job.total = bar
        elif job.status == "cancelling" and job.stage == "attributing":
            _stop_attribution()  # its bar may have opened since the cancel
        return job.to_dict()

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a job: a queued one never starts, a running one stops at its next step and saves
        nothing; a finished one is left as it is. Its place in the queue is freed once it stops."""
        job = self._find(job_id)
        with self._lock:
            if job.status not in ACTIVE:
                return job.to_dict()
            job.cancel.set()
            job.status = "cancelling" if job.status == "running" else "cancelled"
            if job.status == "cancelled":
                job.stage = "cancelled"
        if job.status == "cancelling" and job.stage == "attributing":
            _stop_attribution()
        return job.to_dict()

    def _find(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job '{job_id}': it finished long ago or never existed")
        return job

    def _step(self, job: Job, stage: str) -> None:
        """Enter `stage`, unless the job was cancelled (then stop it here)."""
        if job.cancel.is_set():
            raise Cancelled("cancelled")
        job.stage = stage

    def _attribute(self, job: Job, metadata: dict[str, Any], out: Path, config: AttributionConfig,
                   targets: list[TargetSpec] | None) -> None:
        """A new graph: attribution, scores, saved to `out`."""
        with self.models.lock:
            with self._lock:  # not between a cancel's look at the status and its change
                self._step(job, "loading model")
                job.status = "running"
            rm = self.models.replacement(metadata)
            self._step(job, "attributing")
            graph = attribute(rm, job.prompt, targets, config=config)
            self._step(job, "scoring")
            _, result = prune(graph)
        graph.metadata["scores"] = result.as_dict()  # as `cltrace attribute` writes it
        tc_path = self.models.transcoder_path(metadata)
        if tc_path is not None:
            graph.metadata["transcoder_path"] = str(tc_path)
        self._step(job, "saving")
        graph.save(out)  # atomic: a server stopped now leaves the old file or none, never half of one
        job.graph = self.workspace.rel(out)
        counts = graph.summary()
        job.done = job.total = counts["logit"] + counts["feature"]  # one attribution row per target node
        log.info("new graph %s (%d nodes, %d edges)", out, graph.n_nodes, graph.n_edges)

    def _guarded(self, job: Job, body: Callable[[], None]) -> None:
        """Run a job's `body` in its thread: done, cancelled, or an error in one line, never silence."""
        try:
            body()
            job.status, job.stage = "done", "done"
        except Cancelled:
            job.status, job.stage = "cancelled", "cancelled"
        except CltraceError as exc:
            job.status, job.error = "error", str(exc)
        except Exception as exc:  # noqa: BLE001 - a background thread must report, never vanish silently
            log.exception("%s job %s failed", job.kind, job.id)
            job.status, job.error = "error", f"{type(exc).__name__}: {exc}"
        finally:
            with self._lock:
                self._outputs.pop(job.id, None)
