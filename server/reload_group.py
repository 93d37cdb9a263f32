"""Hot reload across the workers of one `adselect serve --workers N` group: a reload generation on disk.

Each worker process holds its own services, so a reload that one worker performs must reach the others.
The group shares a directory (data_dir/reload/serve-<supervisor pid>, made fresh by server.multiworker and
removed at exit; its path reaches the workers as GROUP_ENV):

- `generation.json`: {"generation": n}. The worker that took an authenticated POST /admin/reload first
  reloads its own services, which loads and checks every file; only when that succeeded does it bump the
  generation (under an exclusive lock, written temp-then-rename). A refused file bumps nothing: every
  worker keeps serving the previous version.
- `worker-<pid>.json`: what one worker serves: the generation it has caught up with, its versions, and
  the error of a refused reload. Written at start, after every reload, removed at exit.

A worker catches up (reloads from the same files) before it serves its next request (one `stat` of
generation.json per request tells whether anything changed) and, when idle, within POLL_S. The worker
that took the call answers once every live worker has switched, or after WAIT_S with the ones still
pending named, so the response shows the versions of every worker.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

GROUP_ENV = "ADSELECT_SERVE_GROUP_DIR"  # set by server.multiworker for the workers it starts; not a user setting
POLL_S = 0.25  # an idle worker checks the generation this often
WAIT_S = 30.0  # the reload call waits at most this long for every worker to switch (a reload loads models)
GENERATION = "generation.json"


def _write_atomic(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ReloadGroup:
    """This worker's view of the group's reload generation (one instance per worker process)."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.pid = os.getpid()
        self.generation = 0  # the generation whose files this worker serves
        self.tried = 0  # the latest generation it tried to catch up with (> generation: that reload was refused)
        self._seen: tuple[int, int] | None = None  # (inode, mtime_ns) of generation.json when last read

    @classmethod
    def from_env(cls) -> ReloadGroup | None:
        """The group of this worker when `adselect serve --workers N` started it; None for a single process."""
        path = os.environ.get(GROUP_ENV)
        return cls(Path(path)) if path else None

    @property
    def _file(self) -> Path:
        return self.dir / GENERATION

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self._file)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns

    def changed(self) -> bool:
        """generation.json differs from when this worker last read it (one stat, no read)."""
        return self._stat() != self._seen

    def current(self) -> int:
        """The group's generation (0 before any reload); remembers the file's state as read."""
        self._seen = self._stat()
        try:
            return int(json.loads(self._file.read_text(encoding="utf-8"))["generation"])
        except FileNotFoundError:
            return 0

    def bump(self) -> int:
        """generation + 1, under an exclusive lock so two reload calls on two workers never write the same number."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                g = self.current() + 1
                _write_atomic(self._file, {"generation": g})
                self._seen = self._stat()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        self.generation = self.tried = g
        return g

    def report(self, *, versions: dict[str, str | None], error: str | None = None) -> None:
        """Publish what this worker serves now (its generation and versions; `error`: a refused catch-up)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        doc = {"pid": self.pid, "generation": self.generation, "tried": self.tried, "versions": versions, "error": error, "at": time.time()}
        _write_atomic(self.dir / f"worker-{self.pid}.json", doc)

    def leave(self) -> None:
        (self.dir / f"worker-{self.pid}.json").unlink(missing_ok=True)

    def workers(self) -> dict[str, dict[str, Any]]:
        """pid -> {"generation", "tried", "versions", "error"} of every live worker of the group (files of dead ones are dropped)."""
        out: dict[str, dict[str, Any]] = {}
        for f in sorted(self.dir.glob("worker-*.json")):
            try:
                doc = json.loads(f.read_text(encoding="utf-8"))
            except (FileNotFoundError, json.JSONDecodeError):  # a worker leaving; the rename makes a torn file impossible
                continue
            pid = int(doc["pid"])
            if not _alive(pid):
                f.unlink(missing_ok=True)
                continue
            out[str(pid)] = {k: doc.get(k) for k in ("generation", "tried", "versions", "error")}
        return out

    def pending(self, generation: int) -> list[str]:
        """Live workers that have not yet tried to catch up with `generation` (a refused try is done: its `error` says why)."""
        return [pid for pid, w in self.workers().items() if max(w["generation"], w["tried"] or 0) < generation]
