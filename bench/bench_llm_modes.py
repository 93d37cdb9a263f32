"""Listwise vs scoring mode on the same impressions, with the bundled model: calls, tokens, shared prefix,
latency, valid-answer rate, MRR/nDCG@10 of the LLM's own ranking, and the top-pick flip rate when the
candidate order changes.

    python bench/bench_llm_modes.py [--llm-url URL] [--catalog demo|games] [--impressions 20]
        [--candidates 10] [--permutations 2,all] [--caller-order all] [--top-logprobs 20]
        [--modes score,listwise] [--tokens-only] [--score-prompt score] [--memo FILE]

Without --llm-url the bundled SmolLM2-135M llama.cpp server is started (and stopped) on a free port.
Each impression is asked three times per mode: candidates in the logged order, reversed, and shuffled
(seeded by the impression id). "flip" = the top pick differs from the logged order's, with a 95%
bootstrap CI over impressions, and paired against listwise on the same impressions.

Scoring modes: `score P=…` is the shipped design (agent.scorer.permutations: rotations of a canonical
order), so the three input orders are the same set of calls and its flip rate is 0 by construction (the
table says so). What tests it instead: MRR/nDCG@10 of the LLM term's ranking against the position-only
baselines (the ranking a model that reads only positions gives: the logged order at P=1, the canonical
order = its tie-break under a balanced design), paired; and `score P=…, caller order`, the same rotations
started from the caller's order (no canonical step), whose flip rate and "term sd: orders/cands" (per
impression, a candidate's LLM term's sd over the three input orders, over the terms' sd across candidates)
say how order-robust the averaging itself is. Identical requests are answered once (a memo in front of
the client; `calls` counts real ones), so smaller P reuse the larger P's rotations where they coincide.
Prompt tokens are the server's own (/extras/tokenize of the ChatML prompt, checked against the usage the
server reports); "static prefix" is the longest token prefix common to every request of the mode,
"impression prefix" the one common to an impression's permutations (what a prefix cache reuses between
the P concurrent calls). Per impression (the logged order's decision): calls, prompt and completion
tokens summed over its calls, latency = its calls' recorded latencies summed (llama.cpp serves one at a time).
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
from agent.scorer import ALL, LLMScorer, Permutations, canonical_order
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
        self.latency_ms: list[float] = []  # the real calls of this run
        # One real call at a time: llama.cpp serves one anyway, and a recorded latency is then the call's own
        # service time, not time spent queued behind the impression's other permutations.
        self._one = asyncio.Lock()

    @property
    def model(self) -> str:
        return self.llm.model

    async def afirst_token(self, messages: Sequence[Message], *, top_logprobs: int, timeout_s: float) -> FirstToken:
        key = json.dumps(["score", messages, top_logprobs], sort_keys=True, default=str)
        if key in self.disk.items and key not in self._memo:
            self._memo[key] = FirstToken(**self.disk.items[key])
        async with self._one:
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
    permutations: Permutations | None = None  # None: listwise
    canonical: bool = True
    tops: dict[str, dict[str, str | None]] = field(default_factory=dict)  # impression -> order -> top pick
    terms: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # impression -> order -> id -> LLM term
    prompts: list[list[int]] = field(default_factory=list)
    by_impression: dict[str, list[list[int]]] = field(default_factory=dict)
    completion_tokens: list[int] = field(default_factory=list)
    reported_prompt_tokens: list[int] = field(default_factory=list)
    impression_ms: list[float] = field(default_factory=list)  # per impression, logged order: its calls' latencies summed
    impression_calls: list[int] = field(default_factory=list)  # per impression, logged order
    impression_prompt_tokens: list[int] = field(default_factory=list)
    impression_completion_tokens: list[int] = field(default_factory=list)
    answers: int = 0
    invalid: int = 0
    missing_labels: int = 0
    labels_asked: int = 0
    rr: dict[str, float] = field(default_factory=dict)  # impression -> reciprocal rank of the click (logged order)
    ndcg: dict[str, float] = field(default_factory=dict)


def bootstrap_ci(flags: Sequence[float], *, reps: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    a = np.asarray(flags, dtype=float)
    if len(a) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = a[rng.integers(0, len(a), size=(reps, len(a)))].mean(axis=1)
    return float(a.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def flip_rate(stats: ModeStats, order: str) -> str:
    flags = [int(t[order] != t["logged"]) for t in stats.tops.values() if t.get("logged") and t.get(order)]
    mean, lo, hi = bootstrap_ci(flags)
    built = " (by construction)" if stats.permutations is not None and stats.canonical else ""
    return f"{mean:.0%} [{lo:.0%}, {hi:.0%}] n={len(flags)}{built}"


def mean_ci(values: Sequence[float], digits: int = 3) -> str:
    if not values:
        return "-"
    mean, lo, hi = bootstrap_ci(values)
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def pct(a: list[float], q: float) -> str:
    """A percentile over the timed values (a memo entry without a service time, NaN, is left out)."""
    timed = [x for x in a if not np.isnan(x)]
    return f"{np.percentile(timed, q):.0f}" if timed else "-"


def rank_metrics(ranking: Sequence[str], clicked: set[str]) -> tuple[float, float]:
    """(reciprocal rank of the first click, nDCG@10), a click not in the ranking counting 0."""
    ranks = [i for i, c in enumerate(ranking, start=1) if c in clicked]
    rr = 1 / ranks[0] if ranks else 0.0
    ideal = sum(1 / np.log2(r + 1) for r in range(1, min(10, len(clicked)) + 1))
    return rr, float(sum(1 / np.log2(r + 1) for r in ranks if r <= 10) / ideal) if ideal else 0.0


def order_spread(stats: ModeStats) -> str:
    """How much a candidate's LLM term moves when only the input order changes: per impression, the sd of each
    candidate's term over the input orders, averaged, over the sd of the terms across candidates (logged order)."""
    ratios = []
    for by in stats.terms.values():
        if len(by) < 2 or "logged" not in by:
            continue
        ids = list(by["logged"])
        across = np.std([by["logged"][c] for c in ids])
        within = np.mean([np.std([by[o][c] for o in by]) for c in ids])
        if across > 0:
            ratios.append(float(within / across))
    return mean_ci(ratios, 2) if ratios else "-"


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


def score_modes(args: argparse.Namespace) -> dict[str, ModeStats]:
    """Largest P first (its calls include the smaller ones' for the canonical design: the memo answers them)."""
    def key(p: Permutations) -> int:
        return args.candidates if p == ALL else min(int(p), args.candidates)

    out = {}
    for p in sorted(args.permutations, key=key, reverse=True):
        out[f"score P={p}"] = ModeStats(f"score P={p}", permutations=p)
    for p in sorted(args.caller_order, key=key, reverse=True):
        out[f"score P={p}, caller order"] = ModeStats(f"score P={p}, caller order", permutations=p, canonical=False)
    return out


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
    stats: dict[str, ModeStats] = score_modes(args) if "score" in modes else {}
    if "listwise" in modes:
        stats["listwise"] = ModeStats("listwise")
    baselines = {name: ModeStats(name) for name in ("position only: logged order", "position only: canonical order")}
    for imp in imps:
        clicked = set(imp["clicked"])
        ids = list(imp["candidates"])
        for name, ranking in (("position only: logged order", ids),
                              ("position only: canonical order", [ids[i] for i in canonical_order(ids, seed_key=imp["impression_id"])])):
            baselines[name].rr[imp["impression_id"]], baselines[name].ndcg[imp["impression_id"]] = rank_metrics(ranking, clicked)
    reranker = LLMReranker.from_settings(settings, chat, registry=registry, max_candidates=args.candidates)
    # Mode by mode (llama.cpp keeps one prompt cache: interleaving the modes' prompts would defeat it).
    for mode, st in stats.items():
        for i, imp in enumerate(imps):
            iid = imp["impression_id"]
            hist = [ads[h] for h in imp["history"]]
            st.tops[iid], st.terms[iid] = {}, {}
            for order_name, ids in orders(imp).items():
                if order_name not in args.orders:
                    continue
                cands = [Candidate(ad=ads[c], priors={}) for c in ids]
                ranking: list[str] | None = None
                if st.permutations is not None:
                    scorer = LLMScorer.from_settings(
                        settings.model_copy(update={"score_prompt_name": args.score_prompt}), memo, registry=registry,
                        permutations=st.permutations, top_logprobs=args.top_logprobs, max_candidates=args.candidates,
                        canonical=st.canonical,
                    )  # fmt: skip
                    calls = scorer.prepare(history_ads=hist, events=[], candidates=cands, seed_key=iid)
                    toks = [await tokens(c.messages) for c in calls]
                    if not args.tokens_only:
                        answered = 0
                        try:
                            res = await scorer.ascore(history_ads=hist, events=[], candidates=cands, timeout_s=args.timeout_s, seed_key=iid)
                            ranking, answered = res.ranking(), res.answered
                            st.terms[iid][order_name] = dict(res.logprob)
                            st.missing_labels += res.missing_labels
                            st.labels_asked += res.answered * len(cands)
                            st.completion_tokens += [t for t in res.completion_tokens if t is not None]
                            st.reported_prompt_tokens += [t for t in res.prompt_tokens if t is not None]
                            if order_name == "logged":
                                # Recorded call latencies, summed: llama.cpp serves one request at a time (vLLM: ~ the max).
                                st.impression_ms.append(sum(res.latency_ms))
                                st.impression_completion_tokens.append(sum(t or 0 for t in res.completion_tokens))
                        except (LLMUnavailable, LLMOutputInvalid):
                            pass
                        st.answers += len(calls)
                        st.invalid += len(calls) - answered
                else:
                    call = reranker.prepare(history_ads=hist, events=[], candidates=cands, rewrite=False)
                    toks = [await tokens(call.messages)]
                    if not args.tokens_only:
                        st.answers += 1
                        try:
                            lres = await reranker.arerank(history_ads=hist, events=[], candidates=cands, timeout_s=args.timeout_s, rewrite=False)
                        except (LLMOutputInvalid, LLMUnavailable):
                            st.invalid += 1
                        else:
                            ranking = list(lres.ranking)
                            st.completion_tokens += [lres.completion_tokens] if lres.completion_tokens is not None else []
                            st.reported_prompt_tokens += [lres.prompt_tokens] if lres.prompt_tokens is not None else []
                            if order_name == "logged":
                                st.impression_ms.append(lres.latency_ms)
                                st.impression_completion_tokens.append(lres.completion_tokens or 0)
                if order_name == "logged":
                    st.impression_calls.append(len(toks))
                    st.impression_prompt_tokens.append(sum(map(len, toks)))
                    if ranking is not None and imp["clicked"]:  # an invalid answer is scored as missing the click
                        st.rr[iid], st.ndcg[iid] = rank_metrics(ranking, set(imp["clicked"]))
                    elif imp["clicked"]:
                        st.rr[iid], st.ndcg[iid] = 0.0, 0.0
                st.prompts += toks
                st.by_impression.setdefault(f"{iid}/{order_name}", []).extend(toks)
                st.tops[iid][order_name] = ranking[0] if ranking else None
            print(f"[{mode} {i + 1}/{len(imps)}] {iid} real calls so far: {memo.calls + chat.calls}", flush=True)
    await http.aclose()
    await memo.llm.aclose()
    report(args, stats, baselines, memo)


def report(args: argparse.Namespace, stats: dict[str, ModeStats], baselines: dict[str, ModeStats], memo: MemoLogprobLLM) -> None:
    print(
        f"\n{args.catalog}: {args.impressions} impressions x {args.candidates} candidates, top_logprobs={args.top_logprobs}, "
        f"score prompt={args.score_prompt}, "
        f"real scoring calls={memo.calls}, their latency p50={pct(memo.latency_ms, 50)}ms p99={pct(memo.latency_ms, 99)}ms"
    )
    head = ("mode", "calls/imp", "prompt tok/imp", "compl. tok/imp", "static prefix", "impr. prefix", "impr. ms p50/p99", "valid",
            "missing lbl", "MRR", "nDCG@10", "flip reversed", "flip shuffled", "term sd: orders/cands")
    rows = [head]
    for st in stats.values():
        mean_prompt = float(np.mean([len(t) for t in st.prompts]))
        static = common_prefix(st.prompts)
        impr = [common_prefix(v) / np.mean([len(t) for t in v]) for v in st.by_impression.values() if len(v) > 1]
        checked = [a == b for a, b in zip(sorted(st.reported_prompt_tokens), sorted(len(t) for t in st.prompts))]
        rows.append((
            st.name,
            f"{np.mean(st.impression_calls):.1f}",
            f"{np.mean(st.impression_prompt_tokens):.0f}",
            f"{np.mean(st.impression_completion_tokens):.1f} (max/call {max(st.completion_tokens)})" if st.completion_tokens else "-",
            f"{static} tok = {static / mean_prompt:.0%}",
            f"{np.mean(impr):.0%}" if impr and st.permutations is not None else "-",
            f"{pct(st.impression_ms, 50)}/{pct(st.impression_ms, 99)} n={sum(not np.isnan(x) for x in st.impression_ms)}",
            f"{st.answers - st.invalid}/{st.answers}" if st.answers else "-",
            f"{st.missing_labels}/{st.labels_asked}" if st.labels_asked else "-",
            mean_ci(list(st.rr.values())),
            mean_ci(list(st.ndcg.values())),
            flip_rate(st, "reversed") if not args.tokens_only else "-",
            flip_rate(st, "shuffled") if not args.tokens_only else "-",
            order_spread(st) if st.permutations is not None else "-",
        ))  # fmt: skip
        if st.reported_prompt_tokens and not all(checked):
            print(f"warning: {st.name}: /extras/tokenize counts differ from the server's usage")
    for b in baselines.values():
        rows.append((b.name, "0", "0", "-", "-", "-", "-", "-", "-", mean_ci(list(b.rr.values())), mean_ci(list(b.ndcg.values())),
                     "-", "-", "-"))  # fmt: skip
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    for r in rows:
        print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    base = baselines["position only: canonical order"].rr
    print("\nMRR minus the position-only baseline (canonical order), paired over the same impressions, 95% bootstrap CI:")
    for st in stats.values():
        diffs = [st.rr[i] - base[i] for i in st.rr if i in base]
        print(f"  {st.name}: {mean_ci(diffs)}")
    if "listwise" in stats:
        lw = stats["listwise"]
        print("\nTop-pick flip, scoring minus listwise, paired over the same impressions, 95% bootstrap CI:")
        for st in stats.values():
            if st is lw:
                continue
            for order in ("reversed", "shuffled"):
                d = [int(st.tops[i][order] != st.tops[i]["logged"]) - int(lw.tops[i][order] != lw.tops[i]["logged"])
                     for i in st.tops if i in lw.tops and all(st.tops[i].get(o) and lw.tops[i].get(o) for o in ("logged", order))]
                print(f"  {st.name} - listwise, {order}: {mean_ci(d, 2)} n={len(d)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llm-url", default=None, help="OpenAI-compatible base URL of a llama.cpp server; default: start the bundled model.")
    ap.add_argument("--catalog", choices=sorted(SAMPLED), default="demo")
    ap.add_argument("--impressions", type=int, default=20)
    ap.add_argument("--candidates", type=int, default=10)
    ap.add_argument("--permutations", default="2,all", help="P values of the shipped (canonical, balanced) design, comma-separated; 'all' = n.")
    ap.add_argument("--caller-order", default="all", help="P values of the same rotations started from the caller's order "
                    "(no canonical step: measures how order-robust the averaging itself is); '' for none.")
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
    def perm(p: str) -> Permutations:
        return ALL if p.strip() == ALL else int(p)

    args.permutations = [perm(p) for p in str(args.permutations).split(",") if p.strip()]
    args.caller_order = [perm(p) for p in str(args.caller_order).split(",") if p.strip()]
    with contextlib.ExitStack() as stack:
        url = args.llm_url
        if url is None:
            server = stack.enter_context(LocalLLMServer.from_settings(Settings(_env_file=None), port=free_port()))
            url = server.base_url
        asyncio.run(run(args, url))


if __name__ == "__main__":
    main()
