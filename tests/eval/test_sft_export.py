"""export-sft: the prompt of each example is the one the service sends for that impression, the answer
is the click in the mode's output format, and the train/valid split is by user."""
from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

from agent.reranker import LLMReranker
from agent.schema import parse_llm_output
from eval.data import load_impressions
from eval.sft_export import examples_for, make_prompter, service_request, user_split, write_sft
from tests.utils.fakes import FakeQueueLLM

DEMO = Path(__file__).resolve().parents[2] / "data" / "demo"


def demo_items(services, n: int):
    return load_impressions(DEMO / "impressions.jsonl", catalog=services.index.row, limit=n).items


def test_rendered_prompt_is_what_the_service_sends(demo_services, demo_settings) -> None:
    from collections import Counter

    fake = FakeQueueLLM()
    selector = replace(demo_services.selector, reranker=LLMReranker.from_settings(demo_settings, fake))
    prompter = make_prompter(demo_settings, mode="listwise")
    checked = 0
    for imp in demo_items(demo_services, 8):
        examples = examples_for(imp, selector=selector, prompter=prompter, mode="listwise", skipped=Counter())
        if not examples:
            continue
        (ex,) = examples
        fake.enqueue('{"ranking": [], "justification": ""}')
        asyncio.run(selector.aselect(service_request(imp, k=selector.llm_max_candidates)))
        sent = fake.calls[-1]["messages"]
        assert ex.messages[:-1] == sent  # system + user, byte for byte
        assert ex.messages[-1]["role"] == "assistant"
        shown = [line.split(" ", 1)[0] for line in sent[1]["content"].splitlines() if line.split(" ", 1)[0] in selector.index.row]
        parsed = parse_llm_output(ex.messages[-1]["content"], shown, require_copy=False, target_id=None)
        assert parsed.ranking[0] in imp.clicked  # the target answer parses as the service parses it, click first
        checked += 1
    assert checked >= 3


def test_score_mode_targets_the_clicked_label_in_every_shown_order(demo_services, demo_settings) -> None:
    from collections import Counter

    prompter = make_prompter(demo_settings, mode="score")
    imp = next(i for i in demo_items(demo_services, 8) if examples_for(i, selector=demo_services.selector, prompter=prompter, mode="score", skipped=Counter()))
    examples = examples_for(imp, selector=demo_services.selector, prompter=prompter, mode="score", skipped=Counter())
    assert len(examples) == prompter.permutations
    for ex in examples:
        label = ex.messages[-1]["content"]
        line = next(row for row in ex.messages[1]["content"].splitlines() if row.startswith(f"{label} "))
        clicked_titles = {demo_services.selector.index.ads[demo_services.selector.index.row[c]].title for c in imp.clicked}
        assert any(t.split(" | ")[0] in line for t in clicked_titles)


def test_split_is_by_user_and_deterministic(demo_services, demo_settings, tmp_path: Path) -> None:
    items = demo_items(demo_services, 80)
    prompter = make_prompter(demo_settings, mode="listwise")
    summary = write_sft(items, selector=demo_services.selector, prompter=prompter, mode="listwise", out_dir=tmp_path, valid_share=0.3, seed=7)
    users = {}
    for split in ("train", "valid"):
        rows = [json.loads(line) for line in (tmp_path / f"{split}.jsonl").open(encoding="utf-8")]
        assert len(rows) == summary["splits"][split]["examples"] > 0
        users[split] = {r["meta"]["user_id"] for r in rows}
        assert all(user_split(u, valid_share=0.3, seed=7) == split for u in users[split])
    assert users["train"].isdisjoint(users["valid"])
    assert summary["impressions_read"] == len(items)
    assert sum(s["impressions"] for s in summary["splits"].values()) + sum(summary["skipped"].values()) == len(items)


def test_cli_refuses_a_missing_source_or_an_unknown_mode(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from adselect.cli import app

    runner = CliRunner()
    base = ["eval", "export-sft", "--ads", str(DEMO / "ads.jsonl"), "--out", str(tmp_path)]
    for extra in ([], ["--log", str(tmp_path)], ["--impressions", str(DEMO / "impressions.jsonl"), "--mode", "pointwise"]):
        r = runner.invoke(app, [*base, *extra])
        assert r.exit_code == 2 and "error:" in r.stderr
