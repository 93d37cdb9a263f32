"""The impression log: append-only rotated JSONL, a never-blocking queue, a reader that survives a torn tail."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from kernel.errors import DataFileError
from kernel.settings import Settings
from retrieval.records import iter_impressions
from selection.impression_log import (
    JsonlImpressionLog,
    LogReadStats,
    ScoredEntry,
    ServedEntry,
    build_record,
    event_hashes,
    iter_log_records,
    log_files,
)

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import sys
from selection.impression_log import JsonlImpressionLog
log = JsonlImpressionLog(sys.argv[1], fsync="never", max_bytes=200000, queue_size=100000)
seq = 0
while seq < 400000:
    if log.write({"seq": seq, "pad": "x" * (seq % 3000)}):
        seq += 1
    if seq % 1000 == 0:
        log.flush()
        print(log.stats().written, flush=True)  # the parent kills while the next records are being written
"""


def test_sigkill_while_writing_loses_no_written_record_and_tears_at_most_one_line(tmp_path: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    acked = 0
    try:
        for line in child.stdout:  # type: ignore[union-attr]
            acked = int(line)
            if acked >= 3000:
                break
        time.sleep(0.02)  # let it write on: the kill lands in the middle of the stream, not at an ack
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert acked >= 3000

    stats = LogReadStats()
    seqs = [r["seq"] for r in iter_log_records(tmp_path, stats=stats)]
    assert seqs == list(range(len(seqs)))  # in order, no gap, no repeat, across rotated files
    assert len(seqs) >= acked  # every record the writer had written before the kill
    assert stats.torn <= 1
    assert stats.files == len(log_files(tmp_path)) > 1  # it rotated by size
    if stats.torn:
        assert stats.torn_files == [str(log_files(tmp_path)[-1])]  # only the last file can be torn


def test_reader_skips_and_counts_a_torn_last_line_but_refuses_a_corrupt_middle_line(tmp_path: Path) -> None:
    log = JsonlImpressionLog(tmp_path, fsync="always")
    for i in range(3):
        assert log.write({"i": i})
    log.close()
    (path,) = log_files(tmp_path)
    with path.open("ab") as fh:
        fh.write(b'{"i": 3, "half')  # a crash in the middle of a line
    stats = LogReadStats()
    assert [r["i"] for r in iter_log_records(tmp_path, stats=stats)] == [0, 1, 2]
    assert (stats.records, stats.torn) == (3, 1)

    with path.open("ab") as fh:  # the torn line is now followed by more lines: corruption, not a tail
        fh.write(b'\n{"i": 4}\n')
    with pytest.raises(DataFileError) as e:
        list(iter_log_records(tmp_path))
    assert e.value.line == 4


def test_a_new_writer_never_appends_to_an_old_file(tmp_path: Path) -> None:
    for i in range(2):
        log = JsonlImpressionLog(tmp_path)
        log.write({"i": i})
        log.close()
    assert len(log_files(tmp_path)) == 2
    assert [r["i"] for r in iter_log_records(tmp_path)] == [0, 1]


def test_rotation_by_age(tmp_path: Path) -> None:
    log = JsonlImpressionLog(tmp_path, max_age_s=0.05)
    for i in range(3):
        log.write({"i": i})
        assert log.flush(5)
        time.sleep(0.06)  # older than max_age_s: the next batch opens a new file
    log.close()
    assert len(log_files(tmp_path)) == 3
    assert [r["i"] for r in iter_log_records(tmp_path)] == [0, 1, 2]


def test_many_threads_write_whole_lines_and_close_drains(tmp_path: Path) -> None:
    log = JsonlImpressionLog(tmp_path, fsync="interval", fsync_interval_s=0.01, max_bytes=4096, queue_size=100000)

    def worker(t: int) -> None:
        for i in range(500):
            assert log.write({"t": t, "i": i, "text": "é\nnewline inside"})

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    log.close()
    records = list(iter_log_records(tmp_path))
    assert sorted((r["t"], r["i"]) for r in records) == [(t, i) for t in range(4) for i in range(500)]
    for t in range(4):  # one writer's records keep their order
        assert [r["i"] for r in records if r["t"] == t] == list(range(500))
    s = log.stats()
    assert (s.accepted, s.written, s.dropped, s.failed, s.queued) == (2000, 2000, 0, 0, 0)


def test_a_full_queue_drops_and_counts_instead_of_blocking(tmp_path: Path) -> None:
    log = JsonlImpressionLog(tmp_path, queue_size=1, fsync="always")
    n = 3000
    results = [log.write({"i": i}) for i in range(n)]
    log.close()
    s = log.stats()
    assert s.accepted + s.dropped == n
    assert s.accepted == sum(results) and s.dropped > 0
    assert s.written == s.accepted == len(list(iter_log_records(tmp_path)))
    assert log.write({"after": "close"}) is False and log.stats().dropped == s.dropped + 1


def test_record_extends_the_canonical_impression_format(tmp_path: Path) -> None:
    secret = b"s" * 32
    rec = build_record(
        request_id="r1",
        user_key="u" * 32,
        now=datetime(2024, 5, 1, 12, 0, 0, 123456),
        history=["a", "b"],
        event_hashes=event_hashes(["I want a racing game"], secret=secret),
        scored=[ScoredEntry("c1", {"dense": 0.5}, score=1.2, pctr=0.1), ScoredEntry("c2", {"dense": 0.1})],
        served=[ServedEntry("c2", propensity=0.25, pctr=0.05, bid=2.0), ServedEntry("c1", propensity=0.5, pctr=0.1, bid=1.0)],
        arm="explore",
        prompt_sha256="abc",
        llm_used=False,
    )
    assert rec["timestamp"] == "2024-05-01T12:00:00.123Z"
    assert rec["served"] == ["c2", "c1"] and rec["slate_propensity"] == 0.125
    assert [a["propensity"] for a in rec["served_ads"]] == [0.25, 0.5]
    assert "racing" not in json.dumps(rec) and len(rec["events"][0]) == 64
    assert rec["clicked"] == [] and rec["candidates"] == ["c1", "c2"]

    log = JsonlImpressionLog(tmp_path)
    log.write(rec)
    log.write(build_record(request_id="r2", user_key="u" * 32, now=datetime(2024, 5, 1), history=["a"],
                           event_hashes=["h"], scored=[], served=[], personalized=False))
    log.close()
    (path,) = log_files(tmp_path)
    read = [r for _, r in iter_impressions(path)]  # the canonical reader the eval harness uses
    assert [(r.impression_id, r.user_id, r.history) for r in read] == [("r1", "u" * 32, ["a", "b"]), ("r2", "u" * 32, [])]
    assert read[1].model_extra["events"] == [] and read[1].model_extra["personalized"] is False

    with pytest.raises(ValueError):
        build_record(request_id="r", user_key="u", now=datetime(2024, 1, 1), history=[], event_hashes=[],
                     scored=[], served=[ServedEntry("x", propensity=0.0)])


def test_from_settings_writes_under_the_data_dir(tmp_path: Path) -> None:
    log = JsonlImpressionLog.from_settings(Settings(_env_file=None, data_dir=tmp_path, impression_log_fsync="never"))
    log.write({"i": 1})
    log.close()
    assert [p.parent for p in log_files(tmp_path / "impressions")] == [tmp_path / "impressions"]
