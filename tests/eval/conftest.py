"""Eval fixtures: real shared data, one session data dir (the catalog is embedded once per session),
small slices of the real files, and a fake LLM that ranks whatever it is sent.

Set ADSELECT_TEST_SHARED_DATA when the shared data is not at ../shared/data. Set ADSELECT_TEST_EVAL_DATA_DIR to keep the session data dir between runs (the Chroma collections
are keyed by catalog hash, so a later session reuses them and skips embedding).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kernel.settings import REPO_ROOT, Settings
from agent.llm import Completion, Message

# The shared data beside the repository (../shared/data); ADSELECT_TEST_SHARED_DATA points elsewhere (a worktree).
SHARED_DATA = Path(os.environ.get("ADSELECT_TEST_SHARED_DATA") or REPO_ROOT.parent / "shared" / "data")
GAMES = SHARED_DATA / "amazon_games_6k"
MIND = SHARED_DATA / "mind_large_chatgptnews"
GAMES_SLICE = 100  # first N sampled dev impressions; the catalog subset is what they reference


@pytest.fixture(scope="session")
def eval_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    keep = os.environ.get("ADSELECT_TEST_EVAL_DATA_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        return Path(keep)
    return tmp_path_factory.mktemp("eval-data")


# The eval tests' sequence model trains for one epoch (the real CLI reads it from the environment too).
SEQUENCE_TEST_EPOCHS = {"ADSELECT_SEQUENCE_MAX_EPOCHS": "1"}


@pytest.fixture(scope="session", autouse=True)
def _one_epoch_sequence_model():
    with pytest.MonkeyPatch.context() as mp:
        for k, v in SEQUENCE_TEST_EPOCHS.items():
            mp.setenv(k, v)
        yield


@pytest.fixture(scope="session")
def eval_settings(eval_data_dir: Path) -> Settings:
    return Settings(_env_file=None, data_dir=eval_data_dir, sequence_max_epochs=1)


@pytest.fixture(scope="session")
def games_slice(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | int]:
    """The first GAMES_SLICE sampled dev impressions (read in place) and the catalog lines they reference.

    The subset catalog keeps the session's embedding small; it is written to a temp dir, never the repo.
    """
    wanted: set[str] = set()
    with (GAMES / "impressions_sampled_dev.jsonl").open() as fh:
        for i, line in enumerate(fh):
            if i >= GAMES_SLICE:
                break
            rec = json.loads(line)
            wanted.update(rec["history"], rec["candidates"], rec["clicked"])
    out = tmp_path_factory.mktemp("games-slice") / "ads.jsonl"
    with (GAMES / "ads.jsonl").open() as src, out.open("w") as dst:
        for line in src:
            if json.loads(line)["ad_id"] in wanted:
                dst.write(line)
    return {"ads": out, "impressions": GAMES / "impressions_sampled_dev.jsonl", "limit": GAMES_SLICE}


@dataclass
class FakeRankingLLM:
    """ChatLLMLike: answers every call with the candidate ids it was sent, in reverse, unless answers are queued.

    Queued answers (raw text or exceptions) are replayed first, in order, like tests/utils FakeQueueLLM.
    """

    model: str = "fake-ranking"
    queue: list[str | BaseException] = field(default_factory=list)
    calls: list[dict[str, Any]] = field(default_factory=list)

    def enqueue(self, *answers: str | BaseException) -> "FakeRankingLLM":
        self.queue.extend(answers)
        return self

    def _answer(self, messages: Sequence[Message], schema: dict[str, Any]) -> Completion:
        self.calls.append({"messages": list(messages), "schema": schema})
        if self.queue:
            a = self.queue.pop(0)
            if isinstance(a, BaseException):
                raise a
            text = a
        else:
            ids = schema["properties"]["ranking"]["items"]["enum"]
            text = json.dumps({"ranking": list(reversed(ids)), "justification": "fake", "headline": "", "description": ""})
        return Completion(text=text, prompt_tokens=10, completion_tokens=5, latency_ms=1.0, model=self.model, finish_reason="stop")

    def complete(self, messages: Sequence[Message], *, schema: dict[str, Any], timeout_s: float) -> Completion:
        return self._answer(messages, schema)

    async def acomplete(self, messages: Sequence[Message], *, schema: dict[str, Any], timeout_s: float) -> Completion:
        return self._answer(messages, schema)


@pytest.fixture
def fake_llm() -> FakeRankingLLM:
    return FakeRankingLLM()


def run_task(doc: dict[str, Any], *, settings: Settings, out: Path, **kw):
    """run_eval on a task document (what the CLI builds from options)."""
    from eval.config import task_from_document
    from eval.harness import run_eval

    return run_eval(task_from_document(doc), settings=settings, out_dir=out, show_progress=False, **kw)


@pytest.fixture(scope="session")
def mind_report(eval_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("mind-report")
    doc = {"name": "mind-test", "data": {"ads": str(MIND / "ads.jsonl"), "impressions": str(MIND / "impressions_dev.jsonl")}, "no_llm": True}
    return run_task(doc, settings=eval_settings, out=out), out
