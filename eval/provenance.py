"""Provenance in one place: what a report or a weights file needs to be reproduced and checked.

File hashes and references (`file_sha256`, `file_ref`, `data_hashes`), the run fingerprint a resume
must match, the exclusion sources of a fit (`exclusion_sources`, `excluded_users`), code version
(`git_state`), fusion weights (`fusion_provenance`) and whether the evaluated users were kept out of
the weights' fit (`fusion_separation`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from selection.fusion import SHIPPED_WEIGHTS, FusionModel
from kernel.settings import REPO_ROOT
from eval.data import read_user_ids

log = logging.getLogger(__name__)


def file_sha256(path: Path) -> str:
    """The file's sha256; a folder of part files (eval run --ray): the sha256 of its files' names and hashes."""
    if Path(path).is_dir():
        parts = sorted(p for p in Path(path).iterdir() if p.is_file())
        return hashlib.sha256("".join(f"{p.name}\t{file_sha256(p)}\n" for p in parts).encode()).hexdigest()
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rel_path(p: Path) -> str:
    """`p` relative to the repository root when it can be (how commands and meta name files)."""
    p = Path(p).resolve()
    try:
        return os.path.relpath(p, REPO_ROOT)
    except ValueError:
        return str(p)


def file_ref(p: Path | None) -> dict[str, str] | None:
    return None if p is None else {"path": rel_path(p), "sha256": file_sha256(p)}


def data_hashes(*, ads: Path, impressions: Path, train: list[Path], resolve) -> dict[str, Any]:
    """The task's data files as given (paths) with the sha256 of the files they resolve to."""
    return {
        "ads": {"path": str(ads), "sha256": file_sha256(resolve(ads))},
        "impressions": {"path": str(impressions), "sha256": file_sha256(resolve(impressions))},
        "train": [{"path": str(p), "sha256": file_sha256(resolve(p))} for p in train]
        or [{"path": str(impressions) + " (the evaluated impressions)", "sha256": None}],
    }


def run_fingerprint(*, task_sha256: str, data: dict[str, Any], weights_path: Path | None) -> dict[str, Any]:
    """What an interrupted run must share with its `--resume`: the task, the data and the weights."""
    return {"task_sha256": task_sha256, "data": data, "weights_sha256": file_sha256(weights_path) if weights_path else None}


def exclusion_sources(*, files: list[Path], tasks: list[str]) -> list[dict[str, Any]]:
    """[{path, sha256, limit, task?, resolved}] for every --exclude file and --exclude-task."""
    from eval.config import load_task, resolve_path

    out: list[dict[str, Any]] = []
    for p in files:
        out.append({**file_ref(p), "limit": None, "resolved": str(p)})
    for name in tasks:
        task = load_task(name)
        if task.data.impressions is None:
            raise ValueError(f"task {name!r} names no impressions file")
        p = resolve_path(task.data.impressions)
        out.append({**file_ref(p), "limit": task.data.limit, "task": task.name, "resolved": str(p)})
    return out


def excluded_users(sources: list[dict[str, Any]]) -> set[str]:
    """The users of every exclusion source (each source's "resolved" path is consumed)."""
    users: set[str] = set()
    for src in sources:
        users |= read_user_ids(Path(src.pop("resolved")), limit=src["limit"])
    return users


def git_state(repo: Path = REPO_ROOT) -> dict[str, Any]:
    def run(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = run("status", "--porcelain", "--untracked-files=no")
    return {"commit": run("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def fusion_provenance(model: FusionModel) -> dict[str, Any]:
    path = model.meta.get("path")
    out: dict[str, Any] = {
        "path": path,
        "sha256": file_sha256(Path(path)) if path and Path(path).is_file() else None,
        "shipped": bool(path) and Path(path).resolve() == SHIPPED_WEIGHTS.resolve(),
        "source": model.meta.get("source"),
        "llm_coef": model.llm_coef,
        "meta": {k: v for k, v in model.meta.items() if k != "path"},
    }
    return out


def _existing(p: Any) -> Path | None:
    if not p:
        return None
    q = Path(p)
    if not q.is_absolute():
        q = REPO_ROOT / q
    return q if q.is_file() else None


def fusion_separation(model: FusionModel, eval_users: set[str], eval_sha256: str, eval_limit: int | None = None) -> dict[str, Any]:
    """Were the weights fitted on the users this report evaluates? Says which files decided it.

    `disjoint` by construction when the evaluated file (up to its limit) is one the fit excluded;
    otherwise the evaluated users are intersected with the users of the training lines the fit read,
    minus the excluded users.
    """
    meta = model.meta
    train = meta.get("train_file")
    exclude = meta.get("exclude") or []
    if isinstance(exclude, dict):
        exclude = [exclude]
    out: dict[str, Any] = {"weights_train": train, "weights_exclude": exclude, "status": "unknown", "overlap_users": None}
    if meta.get("source") == "hand_tuned":
        out["status"] = "not_fitted"
        return out
    if not isinstance(train, dict):
        out["note"] = "the weights do not record their training file"
        return out
    for e in exclude:
        lim = e.get("limit")
        if e.get("sha256") == eval_sha256 and (lim is None or (eval_limit is not None and eval_limit <= lim)):
            out.update(status="disjoint", overlap_users=0, note="the evaluated impressions are ones whose users were excluded from fitting")
            return out
    excl_users: set[str] = set()
    for e in exclude:
        ep = _existing(e.get("path"))
        if ep is not None and file_sha256(ep) == e.get("sha256"):
            excl_users |= read_user_ids(ep, limit=e.get("limit"))
    tp = _existing(train.get("path"))
    if tp is None or file_sha256(tp) != train.get("sha256"):
        out["note"] = "the weights' training file is not available here (or changed): cannot check"
        return out
    overlap = (eval_users - excl_users) & read_user_ids(tp, limit=meta.get("train_lines_read"))
    out["overlap_users"] = len(overlap)
    out["status"] = "overlap" if overlap else "disjoint"
    if overlap:
        out["note"] = "some evaluated users were among the fusion training users: the default's numbers are optimistic"
        log.warning("fusion weights were fitted on evaluated users", extra={"overlap_users": len(overlap)})
    return out


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def runtime() -> dict[str, str]:
    return {"python": platform.python_version(), "platform": platform.platform()}


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=str)
