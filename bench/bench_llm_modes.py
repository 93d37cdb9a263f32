"""Listwise vs scoring mode on the same impressions, with the bundled model: tokens, shared prefix, latency,
valid-answer rate and the top-pick flip rate when the candidate order changes.

    python bench/bench_llm_modes.py [--llm-url URL] [--catalog demo|games] [--impressions 20]
        [--candidates 10] [--permutations 2[,3,4]] [--top-logprobs 20] [--modes score,listwise] [--tokens-only]
        [--score-prompt score]

Without --llm-url the bundled SmolLM2-135M llama.cpp server is started (and stopped) on a free port.
Each impression is asked three times per mode: candidates in the logged order, reversed, and shuffled
(seeded by the impression id). "flip" = the top pick differs from the logged order's, with a 95%
bootstrap CI over impressions. Scoring mode with P=2 averages the shown order and its reverse, so its
answer for the reversed order is the same set of calls by construction: the shuffled column is the test
that is not. Identical requests are answered once (a memo in front of the client; `calls` counts real
ones), so P=1 reuses P=2's first permutation. Prompt tokens are the server's own (/extras/tokenize of
the ChatML prompt, checked against the usage the server reports); "static prefix" is the longest token
prefix common to every request of the mode, "impression prefix" the one common to an impression's
permutations (what a prefix cache reuses between the P concurrent calls).
--tokens-only renders and tokenizes the prompts without calling the model (for the 20-candidate share).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from common import CATALOGS, SHARED_DATA, Settings

from agent.llm import ChatLLM, Completion, Message
from agent.local_server import LocalLLMServer, free_port
from agent.logprob_llm import FirstToken, LogprobChatLLM
from agent.prompts import PromptRegistry
from agent.reranker import LLMReranker
from agent.scorer import LLMScorer
from kernel.errors import LLMOutputInvalid, LLMUnavailable
from kernel.types import Ad, Candidate

SAMPLED = {"games": Path("amazon_games_6k") / "impressions_sampled_dev.jsonl", "demo": CATALOGS["demo"]["impressions"]}
ORDERS = ("logged", "reversed", "shuffled")


def chatml(messages: Sequence[dict[str, str]]) -> str:
    """SmolLM2's chat template (ChatML) with the assistant turn opened, as llama_cpp.server renders it."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


def common_prefix(seqs: list[list[int]]) -> int:
    n = min(map(len, seqs))
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


class DiskMemo:
    """Answers by request on disk (JSONL), so an interrupted or repeated run asks the model once per request."""

    def __init__(self, path: Path | None):
        self.path, self.items = path, {}
        if path is not None and path.exists():
            for line in path.open(encoding="utf-8"):
                with contextlib.suppress(ValueError):
                    row = json.loads(line)
                    self.items[row["key"]] = row["value"]

    def put(self, key: str, value: dict) -> None:
        self.items[key] = value
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps({"key": key, "value": value}) + "\n")


class MemoLogprobLLM:
    """Answers an identical request once (the model is deterministic at temperature 0); counts real calls."""

    def __init__(self, llm: LogprobChatLLM, disk: DiskMemo):
        self.llm, self.calls, self._memo, self.disk = llm, 0, {}, disk
        self.latency_ms: list[float] = []

    @property
    def model(self) -> str:
        return self.llm.model

    async def afirst_token(self, messages: Sequence[Message], *, top_logprobs: int, timeout_s: float) -> FirstToken:
        key = json.dumps(["score", messages, top_logprobs], sort_keys=True, default=str)
        if key in self.disk.items and key not in self._memo:
            self._memo[key] = FirstToken(**self.disk.items[key])
            self.latency_ms.append(self._memo[key].latency_ms)
        if key not in self._memo:
            self.calls += 1
            try:
                self._memo[key] = await self.llm.afirst_token(messages, top_logprobs=top_logprobs, timeout_s=timeout_s)
                self.latency_ms.append(self._memo[key].latency_ms)
                self.disk.put(key, dataclasses.asdict(self._memo[key]))
            except (LLMUnavailable, LLMOutputInvalid) as e:
                self._memo[key] = e
        answer = self._memo[key]
        if isinstance(answer, BaseException):
            raise answer
        return answer


class MemoChatLLM:
    """The listwise client behind the same disk memo (answers by messages + schema)."""

    def __init__(self, llm: ChatLLM, disk: DiskMemo):
        self.llm, self.disk, self.calls = llm, disk, 0
        self.latency_ms: list[float] = []

    @property
    def model(self) -> str:
        return self.llm.model

    def complete(self, messages, *, schema, timeout_s):  # noqa: ANN001, ANN201 - not used by the bench
        raise NotImplementedError

    async def acomplete(self, messages: Sequence[Message], *, schema: dict, timeout_s: float) -> Completion:
        key = json.dumps(["listwise", messages, schema], sort_keys=True, default=str)
        if key not in self.disk.items:
            self.calls += 1
            out = await self.llm.acomplete(messages, schema=schema, timeout_s=timeout_s)
            self.disk.put(key, dataclasses.asdict(out))
        out = Completion(**self.disk.items[key])
        self.latency_ms.append(out.latency_ms)
        return out


@dataclass
class ModeStats:
    name: str
    tops: dict[str, dict[str, str | None]] = field(default_factory=dict)  # impression -> order -> top pick
    prompts: list[list[int]] = field(default_factory=list)
    by_impression: dict[str, list[list[int]]] = field(default_factory=dict)
    completion_tokens: list[int] = field(default_factory=list)
    reported_prompt_tokens: list[int] = field(default_factory=list)
    impression_ms: list[float] = field(default_factory=list)
    answers: int = 0
    invalid: int = 0
    missing_labels: int = 0
    labels_asked: int = 0
    rr: list[float] = field(default_factory=list)


def bootstrap_ci(flags: list[int], *, reps: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    a = np.asarray(flags, dtype=float)
    if len(a) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = a[rng.integers(0, len(a), size=(reps, len(a)))].mean(axis=1)
    return float(a.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def flip_rate(stats: ModeStats, order: str) -> str:
    flags = [int(t[order] != t["logged"]) for t in stats.tops.values() if t.get("logged") and t.get(order)]
    mean, lo, hi = bootstrap_ci(flags)
    return f"{mean:.0%} [{lo:.0%}, {hi:.0%}] n={len(flags)}"


def pct(a: list[float], q: float) -> str:
    return f"{np.percentile(a, q):.0f}" if a else "-"


def load(catalog: str, n: int, n_cand: int, *, shared: Path) -> tuple[dict[str, Ad], list[dict]]:
    ads = {}
    ads_path = CATALOGS[catalog]["ads"] if catalog == "demo" else shared / "amazon_games_6k" / "ads.jsonl"
    for line in open(ads_path, encoding="utf-8"):
        r = json.loads(line)
        ads[r["ad_id"]] = Ad(ad_id=r["ad_id"], title=r["title"], text=r.get("text", ""), category=r.get("category", ""))
    rows = []
    for line in open(shared / SAMPLED[catalog], encoding="utf-8"):
        r = json.loads(line)
        if len(r["candidates"]) >= n_cand and r["history"] and all(c in ads for c in r["candidates"] + r["history"]):
            rows.append({**r, "candidates": r["candidates"][:n_cand]})
        if len(rows) == n:
            break
    return ads, rows


def orders(imp: dict) -> dict[str, list[str]]:
    cands = list(imp["candidates"])
    shuffled = cands[:]
    random.Random(imp["impression_id"]).shuffle(shuffled)
    return {"logged": cands, "reversed": cands[::-1], "shuffled": shuffled}


async def run(args: argparse.Namespace, base_url: str) -> None:
    settings = Settings(_env_file=None)
    ads, imps = load(args.catalog, args.impressions, args.candidates, shared=args.shared_data)
    if not imps:
        raise SystemExit(f"no {args.catalog} impression has {args.candidates} candidates and a history (demo: at most 10; games: 20)")
    registry = PromptRegistry(settings.prompts_dir)
    root = base_url.removesuffix("/v1")
    http = httpx.AsyncClient(timeout=60)

    async def tokens(messages: Sequence[dict[str, str]]) -> list[int]:
        return (await http.post(f"{root}/extras/tokenize", json={"input": chatml(messages)})).json()["tokens"]

    disk = DiskMemo(args.memo)
    memo = MemoLogprobLLM(LogprobChatLLM(base_url=base_url, model=settings.llm_model, timeout_s=args.timeout_s), disk)
    chat = MemoChatLLM(ChatLLM(base_url=base_url, model=settings.llm_model, timeout_s=args.timeout_s, max_tokens=settings.llm_max_tokens), disk)
    modes = [m.strip() for m in args.modes.split(",")]
    perms = sorted({*args.permutations, 1}, reverse=True) if "score" in modes else []  # largest P first: the others reuse its calls
    stats: dict[str, ModeStats] = {f"score P={p}": ModeStats(f"score P={p}") for p in perms}
    if "listwise" in modes:
        stats["listwise"] = ModeStats("listwise")
    reranker = LLMReranker.from_settings(settings, chat, registry=registry, max_candidates=args.candidates)
    # Mode by mode (llama.cpp keeps one prompt cache: interleaving the modes' prompts would defeat it).
    for mode, st in stats.items():
        for i, imp in enumerate(imps):
            hist = [ads[h] for h in imp["history"]]
            st.tops[imp["impression_id"]] = {}
            for order_name, ids in orders(imp).items():
                if order_name not in args.orders:
                    continue
                cands = [Candidate(ad=ads[c], priors={}) for c in ids]
                if mode.startswith("score"):
                    p = int(mode.split("=")[1])
                    scorer = LLMScorer.from_settings(
                        settings.model_copy(update={"score_prompt_name": args.score_prompt}), memo, registry=registry,
                        permutations=p, top_logprobs=args.top_logprobs, max_candidates=args.candidates,
                    )  # fmt: skip
                    calls = scorer.prepare(history_ads=hist, events=[], candidates=cands, seed_key=imp["impression_id"])
                    toks = [await tokens(c.messages) for c in calls]
                    if args.tokens_only:
                        top, answered = None, 0
                    else:
                        try:
                            res = await scorer.ascore(
                                history_ads=hist, events=[], candidates=cands, timeout_s=args.timeout_s,
                                seed_key=imp["impression_id"],
                            )  # fmt: skip
                            top, answered = res.ranking()[0], res.answered
                            st.missing_labels += res.missing_labels
                            st.labels_asked += res.answered * len(cands)
                            st.completion_tokens += [t for t in res.completion_tokens if t is not None]
                            st.reported_prompt_tokens += [t for t in res.prompt_tokens if t is not None]
                            # Recorded call latencies, summed: llama.cpp serves one request at a time (vLLM: ~ the max).
                            st.impression_ms.append(sum(res.latency_ms))
                            if order_name == "logged" and imp["clicked"]:
                                st.rr.append(1 / (res.ranking().index(imp["clicked"][0]) + 1))
                        except (LLMUnavailable, LLMOutputInvalid):
                            top, answered = None, 0
                        st.answers += len(calls)
                        st.invalid += len(calls) - answered
                else:
                    call = reranker.prepare(history_ads=hist, events=[], candidates=cands, rewrite=False)
                    toks = [await tokens(call.messages)]
                    top = None
                    if not args.tokens_only:
                        st.answers += 1
                        try:
                            res = await reranker.arerank(
                                history_ads=hist, events=[], candidates=cands, timeout_s=args.timeout_s, rewrite=False
                            )
                            top = res.ranking[0]
                            st.completion_tokens += [res.completion_tokens] if res.completion_tokens is not None else []
                            st.reported_prompt_tokens += [res.prompt_tokens] if res.prompt_tokens is not None else []
                            if order_name == "logged" and imp["clicked"]:
                                rank = res.ranking.index(imp["clicked"][0]) + 1 if imp["clicked"][0] in res.ranking else None
                                st.rr.append(1 / rank if rank else 0.0)
                        except LLMOutputInvalid:
                            st.invalid += 1
                        except LLMUnavailable:
                            st.invalid += 1
                        else:
                            st.impression_ms.append(res.latency_ms)
                st.prompts += toks
                st.by_impression.setdefault(f"{imp['impression_id']}/{order_name}", []).extend(toks)
                st.tops[imp["impression_id"]][order_name] = top
            print(f"[{mode} {i + 1}/{len(imps)}] {imp['impression_id']} real calls so far: {memo.calls + chat.calls}", flush=True)
    await http.aclose()
    await memo.llm.aclose()
    report(args, stats, memo)


def report(args: argparse.Namespace, stats: dict[str, ModeStats], memo: MemoLogprobLLM) -> None:
    print(
        f"\n{args.catalog}: {args.impressions} impressions x {args.candidates} candidates, top_logprobs={args.top_logprobs}, "
        f"score prompt={args.score_prompt}, "
        f"real scoring calls={memo.calls}, scoring call latency p50={pct(memo.latency_ms, 50)}ms p99={pct(memo.latency_ms, 99)}ms"
    )
    head = ("mode", "prompt tok", "static prefix", "impr. prefix", "compl. tok", "impr. ms p50/p99", "valid", "missing lbl", "MRR", "flip reversed", "flip shuffled")
    rows = [head]
    for st in stats.values():
        mean_prompt = float(np.mean([len(t) for t in st.prompts]))
        static = common_prefix(st.prompts)
        impr = [common_prefix(v) / np.mean([len(t) for t in v]) for v in st.by_impression.values() if len(v) > 1]
        checked = [a == b for a, b in zip(sorted(st.reported_prompt_tokens), sorted(len(t) for t in st.prompts))]
        rows.append((
            st.name,
            f"{mean_prompt:.0f}",
            f"{static} tok = {static / mean_prompt:.0%}",
            f"{np.mean(impr):.0%}" if impr else "-",
            f"{np.mean(st.completion_tokens):.1f} (max {max(st.completion_tokens)})" if st.completion_tokens else "-",
            f"{pct(st.impression_ms, 50)}/{pct(st.impression_ms, 99)}",
            f"{st.answers - st.invalid}/{st.answers}" if st.answers else "-",
            f"{st.missing_labels}/{st.labels_asked}" if st.labels_asked else "-",
            f"{np.mean(st.rr):.3f}" if st.rr else "-",
            flip_rate(st, "reversed") if not args.tokens_only else "-",
            flip_rate(st, "shuffled") if not args.tokens_only else "-",
        ))  # fmt: skip
        if st.reported_prompt_tokens and not all(checked):
            print(f"warning: {st.name}: /extras/tokenize counts differ from the server's usage")
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    for r in rows:
        print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llm-url", default=None, help="OpenAI-compatible base URL of a llama.cpp server; default: start the bundled model.")
    ap.add_argument("--catalog", choices=sorted(SAMPLED), default="demo")
    ap.add_argument("--impressions", type=int, default=20)
    ap.add_argument("--candidates", type=int, default=10)
    ap.add_argument("--permutations", default="2", help="P values to report, comma-separated (P=1 is always reported).")
    ap.add_argument("--score-prompt", default="score", help="Template under prompts/ for scoring mode.")
    ap.add_argument("--top-logprobs", type=int, default=20)
    ap.add_argument("--modes", default="score,listwise")
    ap.add_argument("--timeout-s", type=float, default=300.0)
    ap.add_argument("--tokens-only", action="store_true")
    ap.add_argument("--orders", default=",".join(ORDERS), help="Which of logged,reversed,shuffled to ask (logged is always asked).")
    ap.add_argument("--memo", type=Path, default=None, help="JSONL of answers by request: a re-run asks only what is missing.")
    ap.add_argument("--shared-data", type=Path, default=SHARED_DATA, help="The shared data folder (amazon_games_6k/ inside).")
    args = ap.parse_args()
    args.orders = {"logged", *args.orders.split(",")}
    args.permutations = [int(p) for p in str(args.permutations).split(",")]
    with contextlib.ExitStack() as stack:
        url = args.llm_url
        if url is None:
            server = stack.enter_context(LocalLLMServer.from_settings(Settings(_env_file=None), port=free_port()))
            url = server.base_url
        asyncio.run(run(args, url))


if __name__ == "__main__":
    main()
