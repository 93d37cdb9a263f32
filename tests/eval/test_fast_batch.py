"""The batched fast path (sequence states of a block in one pass, metrics once per distinct positions)
writes the records the one-at-a-time path writes."""
from __future__ import annotations

from eval.harness import fast_chunk_size, fast_record, fast_records
from eval.metrics import metrics_by_protocol
from eval.report import metric_names


def test_block_records_equal_one_at_a_time_records(games_slice, eval_settings) -> None:
    from eval.bm25 import BM25Index
    from eval.data import load_impressions
    from eval.env import prepare_env
    from eval.rankers import FastRankers
    from eval.systems import FAST_SYSTEMS

    env = prepare_env(eval_settings, ads_path=games_slice["ads"], train_paths=[games_slice["impressions"]], show_progress=False)
    sel = env.services.selector
    assert sel.generator.sequence is not None  # the batch has something to batch
    rankers = FastRankers(selector=sel, bm25=BM25Index(env.services.index.ads), systems=list(FAST_SYSTEMS))
    items = load_impressions(games_slice["impressions"], catalog=env.services.index.row, limit=60).items
    for imp in items:
        imp.candidates = rankers.canonical(imp.candidates)
    names = metric_names([100])
    logged = [m for m in names if not m.startswith("recall@")]
    one = [fast_record(imp, rankers, metrics_by_protocol(logged, names)) for imp in items]  # a fresh metrics memo each
    shared = metrics_by_protocol(logged, names)
    assert list(fast_records(items, rankers, shared)) == one
    again = list(fast_records(items, rankers, shared))  # every Positions now seen: values come from the memo
    assert again == one
    again[0]["metrics"]["default"]["mrr"] = -1.0  # a record's metrics are its own, not the memo's
    assert list(fast_records(items[:1], rankers, shared)) == one[:1]


def test_chunks_are_a_few_per_worker_within_bounds() -> None:
    assert fast_chunk_size(6000, 2) == 750
    assert fast_chunk_size(600, 2) == 250
    assert fast_chunk_size(100_000, 2) == 2000
