"""The LLM path with 20 candidates against the local model: tokens per impression, the shared prompt
prefix, latency.

    python bench/bench_llm.py [--llm-url URL] [--catalog demo|games] [--data-dir DIR] [--requests 20]

Without --llm-url the bundled SmolLM2-135M llama.cpp server is started (and stopped) on a free port.
Requests go through the real pipeline (Selector.select with use_llm) with real user histories; the
serving-only stack (caps, breaker) is off so that every request reaches the model. The shared prefix is
measured in the model's own tokens: every request's chat prompt (ChatML, SmolLM2's template) is
tokenized by the server's /extras/tokenize and the longest prefix common to all is reported; it is what
llama.cpp's prompt cache can reuse from one request to the next.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from common import CATALOGS, Settings, ensure_ingested, histories, summary

from selection.services import build_services
from kernel.types import SelectRequest
from agent.llm import ChatLLM
from agent.reranker import LLMReranker


def chatml(messages: list[dict[str, str]]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


def common_prefix(seqs: list[list[int]]) -> int:
    n = min(map(len, seqs))
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llm-url", default=None, help="OpenAI-compatible base URL; default: start the bundled local model.")
    ap.add_argument("--catalog", choices=sorted(CATALOGS), default="games")
    ap.add_argument("--data-dir", type=Path, default=None, help="An already-ingested data dir for --catalog.")
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--candidates", type=int, default=20)
    ap.add_argument("--deadline-ms", type=int, default=120000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_llm_") as tmp, contextlib.ExitStack() as stack:
        data_dir = ensure_ingested(args.catalog, args.data_dir, Path(tmp))
        settings = Settings(
            _env_file=None, data_dir=data_dir, max_deadline_ms=args.deadline_ms, llm_timeout_s=args.deadline_ms / 1000,
            llm_max_candidates=args.candidates,
        )  # fmt: skip
        url, threads = args.llm_url, "?"
        if url is None:
            from agent.local_server import LocalLLMServer, free_port

            server = stack.enter_context(LocalLLMServer.from_settings(settings, port=free_port()))
            url, threads = server.base_url, server.n_threads
        settings = settings.model_copy(update={"llm_url": url})
        # The reranker as configured (max_ranked, text chars, alias ids from settings), with --candidates sent.
        llm = stack.enter_context(ChatLLM.from_settings(settings, base_url=url))
        reranker = LLMReranker.from_settings(settings, llm, max_candidates=args.candidates)
        services = build_services(settings, reranker=reranker, serving=False)
        sel = services.selector
        root = url.removesuffix("/v1")

        hists = histories(CATALOGS[args.catalog]["impressions"], args.requests + args.warmup, seed=args.seed)
        rows = []
        with httpx.Client(timeout=30) as http:
            for i, h in enumerate(hists):
                req = SelectRequest(user_id=f"bench-{i}", history=h, k=3, deadline_ms=args.deadline_ms, use_llm=True)
                stage = sel.prior_stage(req)
                call = sel.reranker.prepare(
                    history_ads=stage.history_ads, events=[], candidates=stage.candidates[: sel.llm_max_candidates], rewrite=True
                )
                t = time.perf_counter()
                d = asyncio.run(sel.aselect(req))
                wall = (time.perf_counter() - t) * 1000
                tokens = http.post(f"{root}/extras/tokenize", json={"input": chatml(call.messages)}).json()["tokens"]
                if i >= args.warmup:
                    rows.append({"d": d, "wall": wall, "tokens": tokens, "sent": len(call.candidate_ids), "call": call})

    used = [r for r in rows if r["d"].llm_used]
    prompt_tok = [r["d"].usage["prompt_tokens"] for r in used]
    completion_tok = [r["d"].usage["completion_tokens"] for r in used]
    ours = [len(r["tokens"]) for r in rows]
    prefix = common_prefix([r["tokens"] for r in rows])
    system_chars = len(rows[0]["call"].messages[0]["content"])
    outcomes = Counter("llm_used" if r["d"].llm_used else r["d"].degraded_reason for r in rows)
    llm_ms = [r["d"].timings_ms["llm"] for r in rows]

    print(f"model {settings.llm_model} at {url} (llama.cpp threads {threads or 'default'}); catalog {args.catalog} ({len(services.index)} ads)")
    info = sel.reranker.prompt_info
    print(f"prompt {info['name']} v{info['version']} sha256 {info['sha256'][:12]}; "
          f"{np.mean([r['sent'] for r in rows]):.0f} candidates sent, max_ranked {sel.reranker.max_ranked}, "
          f"text chars {sel.reranker.max_text_chars}, alias ids {sel.reranker.alias_ids}, max_tokens {settings.llm_max_tokens}")  # fmt: skip
    print(f"{len(rows)} timed requests after {args.warmup} warm-up; outcomes {dict(outcomes)}")
    if used:
        print(f"prompt tokens/impression     : mean {np.mean(prompt_tok):.0f}  min {min(prompt_tok)}  max {max(prompt_tok)} (server usage)")
        print(f"completion tokens/impression : mean {np.mean(completion_tok):.0f}  min {min(completion_tok)}  max {max(completion_tok)}")
        gen_s = [r["d"].timings_ms["llm"] / 1000 for r in used]
        print(f"completion tokens per second of LLM wall time (prompt eval included): {np.sum(completion_tok) / np.sum(gen_s):.1f}")
    print(f"chat prompt, our tokenization: mean {np.mean(ours):.0f} tokens (checks the template against server usage)")
    print(f"shared prefix across all {len(rows)} requests: {prefix} tokens = {prefix / np.mean(ours):.0%} of the mean prompt "
          f"(system message {system_chars} chars, static, first)")  # fmt: skip
    print(f"LLM stage latency   : {summary(llm_ms)}")
    print(f"select() end to end : {summary([r['wall'] for r in rows])}")


if __name__ == "__main__":
    main()
