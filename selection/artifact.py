"""The serving state as one versioned, content-hashed artifact that every replica loads read-only.

An artifact is a directory:

    manifest.json                 format, catalog fingerprint, {relative path: sha256} of every file, components
    fusion.json                   fusion weights and calibration (FusionModel.to_json)
    behaviour/meta.json           ids (row order), n_histories, window, decay
    behaviour/<name>.npy          popularity, cf, forward/symmetric CSR (data, indices, indptr)
    sequence/state.json           the next-item model's config, ids hash, meta (when one was trained)
    sequence/<array>.npy          its arrays

Its **version** is the sha256 (16 hex) of the canonical manifest: every file's hash and the catalog it was
built for, nothing else (no timestamp), so building twice from the same state gives the same version.

`build_artifact` writes it under `root/<version>/` (a temp directory renamed into place: a reader never
sees half an artifact) and points `root/LATEST` at it. `load_artifact` checks every file's sha256 against
the manifest (`ArtifactTampered` on any difference, a missing or an extra file) and the catalog
fingerprint against the replica's catalog (`ArtifactCatalogMismatch`), then memory-maps the arrays
(`np.load(mmap_mode="r")`): replicas on one host share the pages, and a write to them is an error.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from kernel.errors import ArtifactCatalogMismatch, ArtifactTampered
from retrieval.behaviour import BehaviourStats
from retrieval.sequence import SequenceConfig, SequenceModel, ids_digest
from retrieval.store import CatalogIndex
from selection.fusion import FusionModel

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
LATEST = "LATEST"  # in an artifact root: the name of the newest artifact directory
FUSION_FILE = "fusion.json"
BEHAVIOUR_DIR = "behaviour"
SEQUENCE_DIR = "sequence"
VERSION_CHARS = 16
_CSR_PARTS = ("data", "indices", "indptr")


@dataclass
class Artifact:
    version: str
    path: Path
    catalog: dict
    fusion: FusionModel
    behaviour: BehaviourStats
    sequence: SequenceModel | None
    components: dict[str, str | None]  # per-component content hashes, as recorded in the manifest


def catalog_fingerprint(index: CatalogIndex) -> dict:
    """What an artifact must match: the catalog's content hash and its ids in row order."""
    return {"content_hash": index.content_hash, "ids_hash": ids_digest(index.ids), "n_ads": len(index.ids)}


def manifest_version(manifest: dict) -> str:
    hashed = {k: manifest[k] for k in ("format", "catalog", "files")}
    text = json.dumps(hashed, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:VERSION_CHARS]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.ascontiguousarray(array), allow_pickle=False)


def _save_csr(directory: Path, name: str, m: sp.csr_matrix) -> None:
    m = sp.csr_matrix(m, dtype=np.float32)
    for part in _CSR_PARTS:
        _save_npy(directory / f"{name}.{part}.npy", getattr(m, part))


# ---- build ---------------------------------------------------------------------------------------------
def build_artifact(
    root: Path,
    *,
    index: CatalogIndex,
    fusion: FusionModel,
    behaviour: BehaviourStats,
    sequence: SequenceModel | None,
    collection: str,
) -> Path:
    """Write the artifact under `root/<version>/` (reused when that version is already there) and point
    `root/LATEST` at it; returns its directory."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    behaviour = behaviour.aligned_to(index.ids)
    tmp = root / f".build-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        tmp.mkdir()
        (tmp / FUSION_FILE).write_text(json.dumps(fusion.to_json() | {"meta": {}}, sort_keys=True, indent=1))
        b = tmp / BEHAVIOUR_DIR
        b.mkdir()
        meta = {"ids": behaviour.ids, "n_histories": behaviour.n_histories, "window": behaviour.window, "decay": behaviour.decay,
                "cf": behaviour.cf is not None}  # fmt: skip
        (b / "meta.json").write_text(json.dumps(meta, sort_keys=True))
        _save_npy(b / "popularity.npy", np.asarray(behaviour.popularity, dtype=np.float32))
        _save_csr(b, "forward", behaviour.forward)
        _save_csr(b, "symmetric", behaviour.symmetric)
        if behaviour.cf is not None:
            _save_npy(b / "cf.npy", np.asarray(behaviour.cf, dtype=np.float32))
        if sequence is not None:
            s = tmp / SEQUENCE_DIR
            s.mkdir()
            state = {"config": asdict(sequence.config), "ids_hash": sequence.ids_hash, "n_items": sequence.n_items,
                     "arrays": sorted(sequence.arrays), "meta": sequence.meta}  # fmt: skip
            (s / "state.json").write_text(json.dumps(state, sort_keys=True, default=str))
            for name, arr in sequence.arrays.items():
                _save_npy(s / f"{name}.npy", np.asarray(arr, dtype=np.float32))
        files = {p.relative_to(tmp).as_posix(): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {"format": FORMAT, "catalog": catalog_fingerprint(index) | {"collection": collection}, "files": files}
        manifest["components"] = _components(files)
        version = manifest_version(manifest)
        manifest["version"] = version
        (tmp / MANIFEST).write_text(json.dumps(manifest, sort_keys=True, indent=1))
        final = root / version
        if final.exists():
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    latest_tmp = root / f".{LATEST}.{secrets.token_hex(4)}"
    latest_tmp.write_text(version + "\n")
    os.replace(latest_tmp, root / LATEST)
    log.info("artifact built", extra={"artifact": version, "path": str(final), "files": len(files)})
    return final


def _components(files: dict[str, str]) -> dict[str, str | None]:
    """Per-component hashes (12 hex): fusion, behaviour, sequence (None when absent)."""

    def of(prefix: str) -> str | None:
        part = {k: v for k, v in files.items() if k == prefix or k.startswith(prefix + "/")}
        if not part:
            return None
        return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:12]

    return {"fusion": of(FUSION_FILE), "behaviour": of(BEHAVIOUR_DIR), "sequence": of(SEQUENCE_DIR)}


# ---- load ----------------------------------------------------------------------------------------------
def resolve(path: Path) -> Path:
    """An artifact directory (it holds manifest.json), or a root whose LATEST names one."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    latest = path / LATEST
    if latest.is_file():
        return path / latest.read_text().strip()
    raise ArtifactTampered(str(path), "no manifest.json there, and no LATEST naming an artifact")


def verify(path: Path) -> dict:
    """The manifest, once every file's sha256 matches it and no file is missing or extra."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files: dict[str, str] = dict(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArtifactTampered(str(path), f"manifest unreadable ({type(e).__name__})") from e
    if manifest.get("format") != FORMAT:
        raise ArtifactTampered(str(path), f"format {manifest.get('format')!r}, this build reads {FORMAT}")
    if manifest_version(manifest) != manifest.get("version"):
        raise ArtifactTampered(str(path), "the manifest's version is not the hash of its content")
    present = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {MANIFEST}
    if present != set(files):
        odd = sorted(present ^ set(files))
        raise ArtifactTampered(str(path), f"files differ from the manifest: {', '.join(odd[:5])}")
    for rel, want in files.items():
        if _sha256(path / rel) != want:
            raise ArtifactTampered(str(path), f"{rel}: sha256 differs from the manifest")
    return manifest


def _load_npy(path: Path) -> np.ndarray:
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _load_csr(directory: Path, name: str, n: int) -> sp.csr_matrix:
    data, indices, indptr = (_load_npy(directory / f"{name}.{p}.npy") for p in _CSR_PARTS)
    return sp.csr_matrix((data, indices, indptr), shape=(n, n), copy=False)


def load_artifact(path: Path, *, index: CatalogIndex) -> Artifact:
    """Verify, check the catalog, memory-map. ArtifactTampered / ArtifactCatalogMismatch (kernel.errors)."""
    path = resolve(path)
    manifest = verify(path)
    want = catalog_fingerprint(index)
    built = manifest["catalog"]
    if any(built.get(k) != v for k, v in want.items()):
        raise ArtifactCatalogMismatch(
            str(path), version=manifest["version"], built_for=built.get("content_hash", "?"), built_ads=built.get("n_ads"),
            catalog=want["content_hash"], catalog_ads=want["n_ads"],
        )  # fmt: skip
    fusion = FusionModel.from_json(json.loads((path / FUSION_FILE).read_text()))
    fusion.meta.setdefault("path", str(path / FUSION_FILE))
    b = path / BEHAVIOUR_DIR
    meta = json.loads((b / "meta.json").read_text())
    n = len(meta["ids"])
    behaviour = BehaviourStats(
        ids=meta["ids"],
        popularity=_load_npy(b / "popularity.npy"),
        forward=_load_csr(b, "forward", n),
        symmetric=_load_csr(b, "symmetric", n),
        n_histories=meta["n_histories"],
        window=meta["window"],
        decay=meta["decay"],
        cf=_load_npy(b / "cf.npy") if meta.get("cf") else None,
    )
    sequence = None
    s = path / SEQUENCE_DIR
    if (s / "state.json").is_file():
        state = json.loads((s / "state.json").read_text())
        arrays = {name: _load_npy(s / f"{name}.npy") for name in state["arrays"]}
        sequence = SequenceModel(SequenceConfig(**state["config"]), arrays, state["ids_hash"], state["n_items"], state.get("meta", {}))
    log.info("artifact loaded", extra={"artifact": manifest["version"], "path": str(path)})
    return Artifact(manifest["version"], path, built, fusion, behaviour, sequence, dict(manifest.get("components", {})))
