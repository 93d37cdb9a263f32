"""The serving artifact on the real demo catalog: `adselect build` packages behaviour tables, fusion weights,
calibration and the sequence model; services loaded from it decide exactly as services loaded from the data
dir, carry its version in every decision and audit line, and refuse a tampered artifact or one built for
another catalog with a typed error."""
from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from kernel.errors import ArtifactCatalogMismatch, ArtifactTampered
from kernel.settings import Settings
from kernel.types import SelectRequest
from retrieval.ingest import SEQUENCE_DIR
from retrieval.sequence import SequenceConfig, SequenceModel, ids_digest
from retrieval.store import catalog_hash
from selection.artifact import LATEST, build_artifact, load_artifact
from selection.services import behaviour_dir, build_services, load_serving_state, make_store

HISTORIES = [["run-001", "run-004", "run-009"], ["run-002"], ["run-010", "run-003"], []]


def untrained_sequence_model(ids: list[str], *, seed: int = 0) -> SequenceModel:
    """A real SequenceModel with random weights (training it takes ~30 s; serving it does not care)."""
    cfg = SequenceConfig(hidden=16, max_len=8, blocks=1)
    rng = np.random.default_rng(seed)
    d = cfg.hidden

    def r(*shape: int) -> np.ndarray:
        return rng.normal(0, 0.3, size=shape).astype(np.float32)

    arrays = {"items": r(len(ids), d), "pos": r(cfg.max_len, d), "lnf_w": np.ones(d, np.float32), "lnf_b": r(d)}
    arrays |= {
        "b0.ln1_w": np.ones(d, np.float32), "b0.ln1_b": r(d), "b0.ln2_w": np.ones(d, np.float32), "b0.ln2_b": r(d),
        "b0.wqkv": r(d, 3 * d), "b0.bqkv": r(3 * d), "b0.wo": r(d, d), "b0.bo": r(d),
        "b0.w1": r(d, d), "b0.b1": r(d), "b0.w2": r(d, d), "b0.b2": r(d),
    }  # fmt: skip
    return SequenceModel(cfg, arrays, ids_digest(ids), len(ids))


@pytest.fixture
def data_dir(demo_settings: Settings, demo_services, tmp_path: Path) -> Settings:
    """A copy of the demo data dir with a sequence model saved beside the behaviour tables."""
    settings = demo_settings.model_copy(update={"data_dir": tmp_path / "var"})
    shutil.copytree(demo_settings.data_dir, settings.data_dir)
    untrained_sequence_model(demo_services.index.ids).save(behaviour_dir(settings) / SEQUENCE_DIR)
    return settings


def build(settings: Settings, out: Path) -> Path:
    """What `adselect build` does (tests/server/test_replicas.py runs the command itself)."""
    store = make_store(settings)
    index = store.load_index()
    state = load_serving_state(settings, index)
    path = build_artifact(out, index=index, fusion=state.fusion, behaviour=state.behaviour, sequence=state.sequence, collection=settings.collection)
    assert (out / LATEST).read_text().strip() == path.name
    return path


def mapped(a: np.ndarray) -> bool:
    """True when `a` is (a view of) a memory-mapped file."""
    while a is not None:
        if isinstance(a, np.memmap):
            return True
        a = a.base if isinstance(a.base, np.ndarray) else None
    return False


def decide(services, history: list[str]) -> tuple:
    req = SelectRequest(user_id="u-artifact", history=history, events=["searched: running shoes"], k=3, use_llm=False)
    d = asyncio.run(services.selector.aselect(req))
    return [a.ad.ad_id for a in d.ads], [a.score for a in d.ads], list(d.ranking), d.versions


def test_build_then_load_gives_the_same_decisions_and_names_the_artifact(data_dir: Settings, embedder, tmp_path: Path):
    path = build(data_dir, tmp_path / "artifacts")
    assert build(data_dir, tmp_path / "artifacts") == path  # content-hashed: the same state, the same version
    # both serving (rules, caps in their own data dirs, audit): the same requests in the same order
    from_files = build_services(data_dir, embedder=embedder, audit=lambda rec: None)
    audit: list[dict] = []
    replica = build_services(
        data_dir.model_copy(update={"artifact_dir": tmp_path / "artifacts", "data_dir": tmp_path / "replica"}),
        embedder=embedder, store=from_files.store, audit=audit.append,
    )  # fmt: skip
    assert mapped(replica.behaviour.cf) and mapped(replica.behaviour.forward.data) and mapped(replica.selector.generator.sequence.items)
    for history in HISTORIES:
        ids_a, scores_a, ranking_a, versions_a = decide(from_files, history)
        ids_b, scores_b, ranking_b, versions_b = decide(replica, history)
        assert ids_a and ids_b == ids_a and ranking_b == ranking_a
        assert scores_b == pytest.approx(scores_a, rel=1e-6, abs=1e-9)
        assert versions_a["weights"] == versions_b["weights"] and versions_a["artifact"] is None
        assert versions_b["artifact"] == path.name
    assert audit and all(rec["versions"]["artifact"] == path.name for rec in audit)


@pytest.mark.parametrize("tamper", ["flip_byte", "extra_file", "missing_file", "manifest_edit"])
def test_a_tampered_artifact_is_refused(data_dir: Settings, demo_services, tmp_path: Path, tamper: str):
    path = build(data_dir, tmp_path / "artifacts")
    if tamper == "flip_byte":
        f = path / "behaviour" / "popularity.npy"
        raw = bytearray(f.read_bytes())
        raw[-1] ^= 0x01
        f.write_bytes(bytes(raw))
    elif tamper == "extra_file":
        (path / "behaviour" / "popularity.npy.bak").write_bytes(b"x")
    elif tamper == "missing_file":
        (path / "sequence" / "items.npy").unlink()
    else:  # the manifest updated to the edited file: its version no longer is the hash of its content
        f = path / "fusion.json"
        f.write_text(f.read_text() + "\n")
        m = json.loads((path / "manifest.json").read_text())
        m["files"]["fusion.json"] = hashlib.sha256(f.read_bytes()).hexdigest()
        (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactTampered):
        load_artifact(tmp_path / "artifacts", index=demo_services.index)
    settings = data_dir.model_copy(update={"artifact_dir": path})
    with pytest.raises(ArtifactTampered):
        build_services(settings, embedder=demo_services.embedder, store=demo_services.store, serving=False)


def test_an_artifact_built_for_another_catalog_is_refused(data_dir: Settings, demo_services, tmp_path: Path):
    path = build(data_dir, tmp_path / "artifacts")
    full = demo_services.index
    keep = len(full.ids) - 1  # the same catalog less one ad
    other = replace(
        full, ids=full.ids[:keep], row={a: i for i, a in enumerate(full.ids[:keep])}, ads=full.ads[:keep],
        vectors=full.vectors[:keep], content_hash=catalog_hash(full.ads[:keep]),
    )  # fmt: skip
    with pytest.raises(ArtifactCatalogMismatch) as err:
        load_artifact(path, index=other)
    assert err.value.version == path.name and err.value.catalog == other.content_hash
    reordered = replace(full, ids=full.ids[::-1], row={a: i for i, a in enumerate(full.ids[::-1])})  # other row order
    with pytest.raises(ArtifactCatalogMismatch):
        load_artifact(path, index=reordered)
    assert load_artifact(path, index=full).version == path.name


def test_reload_switches_to_the_version_latest_names_and_refuses_a_tampered_one(data_dir: Settings, embedder, tmp_path: Path):
    from selection.fusion import FusionModel
    from selection.services import reload_services

    first = build(data_dir, tmp_path / "artifacts")
    settings = data_dir.model_copy(update={"artifact_dir": tmp_path / "artifacts"})
    svc = build_services(settings, embedder=embedder, serving=False)
    assert svc.versions["artifact"] == first.name
    store = make_store(data_dir)
    index = store.load_index()
    state = load_serving_state(data_dir, index)
    second = build_artifact(
        tmp_path / "artifacts", index=index, fusion=FusionModel.hand_tuned(), behaviour=state.behaviour, sequence=state.sequence,
        collection=data_dir.collection,
    )  # fmt: skip
    assert second.name != first.name
    new = reload_services(svc)
    assert new.versions["artifact"] == second.name and new.versions["weights"] != svc.versions["weights"]
    (second / "fusion.json").write_text((second / "fusion.json").read_text() + " ")
    from kernel.errors import ReloadRefused

    with pytest.raises(ReloadRefused) as err:
        reload_services(new)
    assert err.value.component == "artifact"
