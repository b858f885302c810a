"""The explorer's circuit routes (`cltrace.serve.circuit`), through FastAPI's TestClient on a trace
folder of the tiny model's acronym graph with a circuit.json written by hand (`hand_circuit`).

Ground truths: the circuit file on disk, the graph file (node ids, activations), and edits worked
out here by hand; re-validation against `build_circuit` and `validate_circuit` run directly.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from helpers.serve import build_trace_folder, hand_circuit, replacement

from cltrace.graph.graph import Graph, NodeKind
from cltrace.replacement.supernodes import load_supernodes

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from cltrace.serve import create_app  # noqa: E402
from cltrace.serve.circuit import apply_edit  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_trace_folder(tmp_path_factory.mktemp("circuit") / "traces")


@pytest.fixture
def folder(built: dict[str, Path], tmp_path: Path) -> dict:
    """A fresh copy of the trace folder for each test (the edits change circuit.json)."""
    root = tmp_path / "traces"
    shutil.copytree(built["root"], root, symlinks=True)
    return {"root": root, "circuit": root / "acronym" / "circuit.json", "rel": built["rel"], "graph": root / built["rel"]}


@pytest.fixture
def client(folder: dict) -> TestClient:
    app = create_app(folder["root"])
    with TestClient(app, raise_server_exceptions=False, base_url="http://127.0.0.1") as c:
        yield c


def on_disk(folder: dict) -> dict:
    return json.loads(folder["circuit"].read_text())


def edit_of(circuit: dict) -> list[dict]:
    return [{"id": s["id"], "name": s["name"], "members": list(s["members"])} for s in circuit["supernodes"]]


def put(client: TestClient, folder: dict, supernodes: list[dict]):
    return client.put("/api/circuit", params={"path": folder["rel"]}, json={"supernodes": supernodes})


def test_get_gives_the_trace_folders_circuit_and_the_view_says_it_has_one(client: TestClient, folder: dict) -> None:
    r = client.get("/api/circuit", params={"path": folder["rel"]})
    assert r.status_code == 200 and r.json() == on_disk(folder)
    assert client.get("/api/graph", params={"path": folder["rel"]}).json()["has_circuit"] is True


def test_a_graph_without_its_circuit_gets_404_in_one_line(client: TestClient, folder: dict) -> None:
    other = folder["root"] / "acronym" / "other.safetensors"  # same folder, but circuit.json names graph.safetensors
    shutil.copy(folder["graph"], other)
    for rel in ["acronym/other.safetensors"]:
        assert client.get("/api/graph", params={"path": rel}).json()["has_circuit"] is False
        for method in ("GET", "PUT", "POST"):
            url = "/api/circuit/validate" if method == "POST" else "/api/circuit"
            body = {"supernodes": edit_of(on_disk(folder))} if method == "PUT" else None
            r = client.request(method, url, params={"path": rel}, json=body)
            assert r.status_code == 404 and "cltrace trace" in r.json()["detail"] and "\n" not in r.json()["detail"]
    r = client.get("/api/circuit", params={"path": "../outside.safetensors"})
    assert r.status_code == 403


def test_rename_keeps_every_number(client: TestClient, folder: dict) -> None:
    before = on_disk(folder)
    edit = edit_of(before)
    edit[1]["name"] = "says the acronym's next letter"
    r = put(client, folder, edit)
    assert r.status_code == 200
    after = on_disk(folder)
    assert r.json() == after
    assert after["supernodes"][1]["name"] == "says the acronym's next letter"
    expected = json.loads(json.dumps(before))
    expected["supernodes"][1]["name"] = "says the acronym's next letter"
    assert after == {**expected, "edited": False}  # effects, labels, edges and validation as they were


def test_merge_takes_both_members_and_the_first_ones_labels_and_drops_what_no_longer_holds(client: TestClient, folder: dict) -> None:
    before = on_disk(folder)
    s0, s1, s2, s3 = before["supernodes"]
    edit = [{"id": "s0", "name": "merged", "members": s0["members"] + s1["members"]}, *edit_of(before)[2:]]
    r = put(client, folder, edit)
    assert r.status_code == 200
    after = on_disk(folder)
    merged = after["supernodes"][0]
    graph = Graph.load(folder["graph"])
    acts = dict(zip(graph.node_ids(), graph.nodes.activation.tolist()))
    assert merged["members"] == s0["members"] + s1["members"]
    assert merged["activation"] == pytest.approx(sum(acts[m] for m in merged["members"]))
    assert merged["layers"] == sorted(set(s0["layers"]) | set(s1["layers"])) and merged["pos"] == max(s0["pos"], s1["pos"])
    assert merged["input_label"] == s0["input_label"] and merged["label_scores"] == s0["label_scores"]
    assert merged["effect"] is None and merged["validation"] is None and merged["edited"] is True
    assert after["supernodes"][1:] == [s2, s3]  # untouched
    assert after["edited"] is True and after["validation"] == before["validation"]
    # edges: those between what is unchanged stay, those of s0 and s1 go until re-validation
    kept = [e for e in before["edges"] if {e["source"], e["target"]}.isdisjoint({"s0", "s1"})]
    assert after["edges"] == kept and len(kept) < len(before["edges"])
    assert after["inputs"] == [x for x in before["inputs"] if x["id"] in {e["source"] for e in kept}]
    assert len(after["inputs"]) < len(before["inputs"])
    # a later rename keeps the circuit marked edited
    assert put(client, folder, [{**edit[0], "name": "renamed"}, *edit[1:]]).json()["edited"] is True
    # the folder's supernodes file, which `cltrace circuit` builds from, holds the same groups; the rest stay
    groups = load_supernodes(folder["root"] / "acronym" / "supernodes.json")
    as_ids = {name: [f"{l}_{f}_{p}" for l, f, p in g.members] for name, g in groups.items()}
    assert list(as_ids) == ["s0", "s2", "s3", "other"]
    assert as_ids["s0"] == merged["members"] and as_ids["s2"] == s2["members"]
    assert len(as_ids["other"]) == 2


def test_split_moves_members_into_a_new_supernode(client: TestClient, folder: dict) -> None:
    before = on_disk(folder)
    edit = edit_of(before)
    a, b = edit[2]["members"]
    edit[2]["members"] = [a]
    edit.insert(3, {"id": "s2.2", "name": "split off", "members": [b]})
    after = put(client, folder, edit).json()
    ids = [s["id"] for s in after["supernodes"]]
    assert ids == ["s0", "s1", "s2", "s2.2", "s3"]
    s2, new = after["supernodes"][2], after["supernodes"][3]
    groups = load_supernodes(folder["root"] / "acronym" / "supernodes.json")
    assert list(groups) == ["s0", "s1", "s2", "s2.2", "s3", "other"] and groups["s2.2"].members == [tuple(map(int, b.split("_")))]
    assert s2["members"] == [a] and new["members"] == [b] and new["name"] == "split off"
    assert new["output_label"] == before["supernodes"][2]["output_label"]  # the labels of the group it came from
    assert s2["edited"] and new["edited"] and s2["effect"] is None
    assert new["layers"] == [int(b.split("_")[0])] and new["pos"] == int(b.split("_")[2])


def test_an_edit_takes_features_from_the_other_groups_and_makes_the_file_where_there_was_none(client: TestClient, folder: dict) -> None:
    file = folder["root"] / "acronym" / "supernodes.json"
    other = load_supernodes(file)["other"]
    taken = "_".join(map(str, other.members[0]))
    edit = edit_of(on_disk(folder))
    edit[0]["members"].append(taken)  # a feature of a group outside the circuit joins it
    assert put(client, folder, edit).status_code == 200
    groups = load_supernodes(file)
    assert groups["other"].members == other.members[1:] and taken in on_disk(folder)["supernodes"][0]["members"]
    file.unlink()
    assert put(client, folder, edit_of(on_disk(folder))).status_code == 200
    assert list(load_supernodes(file)) == ["s0", "s1", "s2", "s3"]


def test_bad_edits_are_refused_in_one_line_and_change_nothing(client: TestClient, folder: dict) -> None:
    before = folder["circuit"].read_bytes()
    before_groups = (folder["root"] / "acronym" / "supernodes.json").read_bytes()
    edit = edit_of(on_disk(folder))
    graph = Graph.load(folder["graph"])
    error_node = next(i for i, k in zip(graph.node_ids(), graph.nodes.kind.tolist()) if k == NodeKind.ERROR)
    cases = {
        400: [
            ([{**edit[0], "members": [error_node]}, *edit[1:]], "not a feature node"),
            ([{**edit[0], "members": edit[0]["members"] + edit[1]["members"][:1]}, *edit[1:]], "belongs to one supernode"),
            ([edit[0], {**edit[1], "id": "s0"}], "share the id"),
            ([{**edit[0], "id": "out"}, *edit[1:]], "kept for the circuit's tokens"),
            ([{**edit[0], "id": "e77"}, *edit[1:]], "kept for the circuit's tokens"),
            ([{**edit[0], "members": ["99_0_0"]}], "not a feature node"),
        ],
        422: [([{**edit[0], "id": "has space"}], "id"), ([{**edit[0], "members": []}], "members"), ([], "supernodes"),
              ([{**edit[0], "name": ""}], "name")],
    }
    for status, bodies in cases.items():
        for body, words in bodies:
            r = put(client, folder, body)
            assert r.status_code == status, (body, r.text)
            assert words in r.json()["detail"] and "\n" not in r.json()["detail"]
    assert folder["circuit"].read_bytes() == before
    assert (folder["root"] / "acronym" / "supernodes.json").read_bytes() == before_groups


def test_apply_edit_on_a_circuit_dict(folder: dict) -> None:
    """The same rules without the server: an edit that leaves everything as it was changes nothing."""
    graph = Graph.load(folder["graph"])
    circuit = hand_circuit(graph)
    assert apply_edit(circuit, edit_of(circuit), graph) == {**circuit, "edited": False}
    dropped = apply_edit(circuit, edit_of(circuit)[:3], graph)  # a supernode taken out of the circuit
    assert dropped["edited"] is True and all("s3" not in (e["source"], e["target"]) for e in dropped["edges"])


def wait_for(client: TestClient, job: dict, seconds: float = 120) -> dict:
    deadline = time.monotonic() + seconds
    while job["status"] in ("queued", "running", "cancelling") and time.monotonic() < deadline:
        time.sleep(0.1)
        job = client.get(f"/api/jobs/{job['id']}").json()
    return job


@pytest.fixture
def model_client(folder: dict) -> TestClient:
    app = create_app(folder["root"], loader=lambda _metadata: replacement())
    with TestClient(app, raise_server_exceptions=False, base_url="http://127.0.0.1") as c:
        yield c


def test_revalidation_rebuilds_the_edited_circuit_as_build_and_validate_do(model_client: TestClient, folder: dict) -> None:
    """Merge two supernodes, re-validate: the saved circuit is what `build_circuit` and
    `validate_circuit` make of the edited supernodes, with the names and labels a person left."""
    from cltrace.graph.circuit import Circuit, build_circuit
    from cltrace.graph.validate import validate_circuit

    before = on_disk(folder)
    edit = [{"id": "s0", "name": "merged by hand", "members": before["supernodes"][0]["members"] + before["supernodes"][1]["members"]},
            *edit_of(before)[2:]]
    assert put(model_client, folder, edit).status_code == 200
    edited = Circuit.from_dict(on_disk(folder))
    picture = folder["circuit"].parent / "circuit.png"  # a trace folder's picture: drawn again with the new numbers
    picture.write_bytes(b"the picture from before")
    r = model_client.post("/api/circuit/validate", params={"path": folder["rel"]})
    assert r.status_code == 202, r.text
    job = wait_for(model_client, r.json())
    assert job["status"] == "done" and job["kind"] == "circuit" and job["done"] == job["total"] == 4, job
    after = on_disk(folder)
    graph = Graph.load(folder["graph"])
    truth = build_circuit(graph, edited.as_supernodes(), max_supernodes=3, min_coverage=1.0, names=edited.names(),
                          graph_file="graph.safetensors")
    validate_circuit(replacement(), graph, truth)
    truth_dict = truth.to_dict()
    assert [s["id"] for s in after["supernodes"]] == [s["id"] for s in truth_dict["supernodes"]]
    assert {s["id"]: s["name"] for s in after["supernodes"]}["s0"] == "merged by hand"
    for got, want in zip(after["supernodes"], truth_dict["supernodes"]):
        assert got["effect"] == pytest.approx(want["effect"])
        assert got["validation"]["ablate"] == pytest.approx(want["validation"]["ablate"])
        assert got["input_label"] == {s.id: s for s in edited.supernodes}[got["id"]].input_label  # kept, not rebuilt
    assert [(e["source"], e["target"]) for e in after["edges"]] == [(e["source"], e["target"]) for e in truth_dict["edges"]]
    assert [e["weight"] for e in after["edges"]] == pytest.approx([e["weight"] for e in truth_dict["edges"]])
    assert after["validation"]["pearson_r"] == pytest.approx(truth_dict["validation"]["pearson_r"])
    assert not after.get("edited")
    assert after["coverage"] == before["coverage"]  # how the circuit was first chosen: kept
    assert picture.read_bytes().startswith(b"\x89PNG\r\n")


def test_an_edit_during_revalidation_is_not_overwritten(folder: dict) -> None:
    """The job saves only if circuit.json is as it read it: an edit made meanwhile wins, and the job says so."""
    from cltrace.errors import CltraceError
    from cltrace.serve.circuit import revalidate
    from cltrace.serve.jobs import Job, Models
    from cltrace.serve.workspace import Workspace

    workspace = Workspace(folder["root"])
    work = revalidate(workspace, Models(loader=lambda _m: replacement()), folder["graph"], folder["circuit"])
    edited_meanwhile = json.dumps({**on_disk(folder), "prompt": "changed meanwhile"})

    def step(stage: str) -> None:
        if stage == "validating":
            folder["circuit"].write_text(edited_meanwhile)

    picture = folder["circuit"].parent / "circuit.png"
    picture.write_bytes(b"the picture of the edited circuit")
    with pytest.raises(CltraceError, match="edited while it was being validated"):
        work(Job(id="x", prompt="p", kind="circuit"), step)
    assert folder["circuit"].read_text() == edited_meanwhile
    assert picture.read_bytes() == b"the picture of the edited circuit"
