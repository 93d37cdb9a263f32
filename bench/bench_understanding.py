"""Ad understanding over a catalog with the bundled model: validated records, counted failures, time per ad,
the re-run's cache hits, and (for a catalog with editor categories) how often the extracted category agrees.

    python bench/bench_understanding.py --ads data/demo/ads.jsonl [--n 60] [--taxonomy] [--llm-url URL] [--store-dir DIR]

--taxonomy restricts the extracted category to the catalog's own category list (what MIND's editor
categories allow measuring: agreement = extracted == editor category). Without --llm-url the bundled
SmolLM2 llama.cpp server is started on a free port. The sample is the first N ads after a seeded shuffle.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import random
import tempfile
from collections import Counter
from pathlib import Path

from common import Settings

from agent.llm import ChatLLM
from agent.local_server import LocalLLMServer, free_port
from agent.understanding import AdUnderstander, UnderstandingStore
from kernel.types import Ad

FIELDS = ("ad_id", "title", "text", "category", "subcategory", "advertiser", "landing_url")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ads", type=Path, required=True)
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--taxonomy", action="store_true")
    ap.add_argument("--llm-url", default=None)
    ap.add_argument("--store-dir", type=Path, default=None)
    args = ap.parse_args()
    settings = Settings(_env_file=None)
    rows = [json.loads(line) for line in args.ads.open(encoding="utf-8")]
    catalog = len(rows)
    random.Random(args.seed).shuffle(rows)
    truth = {r["ad_id"]: (r.get("category") or "").casefold() for r in rows}
    ads = [Ad(**{k: r[k] for k in FIELDS if k in r}) for r in rows[: args.n]]
    taxonomy = sorted({c for c in truth.values() if c}) if args.taxonomy else None
    with contextlib.ExitStack() as stack:
        url = args.llm_url or stack.enter_context(LocalLLMServer.from_settings(settings, port=free_port())).base_url
        store_dir = args.store_dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        llm = ChatLLM(base_url=url, model=settings.llm_model, max_tokens=settings.understand_max_tokens, timeout_s=600)
        understander = AdUnderstander.from_settings(settings, llm, store=UnderstandingStore(store_dir), taxonomy=taxonomy)
        understander.timeout_s = 600  # a shared CPU: the bench measures, it does not enforce a deadline
        first = understander.run(ads)
        rerun = AdUnderstander.from_settings(settings, llm, store=UnderstandingStore(store_dir), taxonomy=taxonomy).run(ads)
        records = {ad.ad_id: understander.get(ad) for ad in ads}
    done = first.generated + sum(first.invalid.values())
    per_ad = first.seconds / max(done, 1)
    print(f"\n{args.ads} ({catalog} ads), sample n={len(ads)} seed={args.seed}, taxonomy={'catalog categories' if taxonomy else 'none'}")
    print(f"first run : {json.dumps(first.as_dict())}")
    print(f"re-run    : cached {rerun.cached}/{rerun.ads} = {rerun.as_dict()['hit_rate']:.0%}, generated {rerun.generated}")
    print(f"time      : {per_ad:.1f} s/ad -> the whole catalog ({catalog} ads) ~ {per_ad * catalog / 60:.0f} min at this load")
    ok = [(truth[a], r.category) for a, r in records.items() if r is not None and truth[a]]
    if ok:
        agree = sum(t == c for t, c in ok)
        print(f"category  : extracted == catalog category for {agree}/{len(ok)} = {agree / len(ok):.0%} of validated records "
              f"({agree}/{len(ads)} = {agree / len(ads):.0%} of the sample); majority-class baseline "
              f"{Counter(t for t, _ in ok).most_common(1)[0][1] / len(ok):.0%}")
        print(f"extracted : {Counter(c for _, c in ok).most_common(6)}")
    claims = sum(len(r.claims) for r in records.values() if r is not None)
    print(f"claims    : {claims} kept (found in the ad's text), {first.dropped_claims} dropped (not in the ad's text)")


if __name__ == "__main__":
    main()
