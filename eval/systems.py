"""The systems an eval run compares, by name, each with its rankers. Unknown names fail with "did you mean".

Fast systems carry a ranker per protocol (eval/baselines.py: `logged` ranks the shown candidates,
`full` retrieves from the whole catalog) and are computed for every impression (eval/rankers.py). LLM
systems are ranked from the Selector's decision on the LLM sample (eval/llm_phase.py), through the
same Selector the endpoint serves.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kernel.errors import UnknownName
from eval import baselines as b

Ranker = Callable[[b.Resources, object], list[str]]


@dataclass(frozen=True, slots=True)
class System:
    name: str
    needs_llm: bool
    description: str
    logged: Ranker | None = None  # rank the shown candidates (a baselines.LoggedView)
    full: Ranker | None = None  # retrieve from the whole catalog (a baselines.FullView)


SYSTEMS: dict[str, System] = {
    s.name: s
    for s in (
        System("random", False, "a seeded random order (full catalog: random ads)", b.random_logged, b.random_full),
        System(
            "popularity", False, "ads by how often they occur in the training histories",
            b.prior_feature_logged("popularity"), b.popularity_full,
        ),  # fmt: skip
        System("bm25", False, "BM25 over ad documents; query = history titles + events", b.bm25_logged, b.bm25_full),
        System(
            "dense", False, "MiniLM cosine to the recency-weighted history profile (the `dense` prior; Chroma on the full catalog)",
            b.prior_feature_logged("dense"), b.dense_full,
        ),  # fmt: skip
        System(
            "covisit", False, "recency-weighted co-visitation with the history (the `covisit` prior)",
            b.prior_feature_logged("covisit"), b.covisit_full,
        ),  # fmt: skip
        System(
            "sequence", False, "the trained next-item sequence model (SASRec-style) alone (the `sequence` prior and source)",
            b.prior_feature_logged("sequence"), b.sequence_full,
        ),  # fmt: skip
        System(
            "default", False, "the pipeline's prior ranking with the LLM off (Decision.ranking of the fast path)",
            b.default_logged, b.default_full,
        ),  # fmt: skip
        System(
            "served", False, "default's candidates in the order the endpoint serves them: bid × pCTR under rank_by=expected_value "
            "(selection.pipeline.serving_order; the full catalog: the served head, then the prior order)",
            b.served_logged, b.served_full,
        ),  # fmt: skip
        System("llm", True, "the LLM's own ranking of the top-N prior candidates, the rest after in prior order"),
        System("default+llm", True, "the full pipeline: prior fused with the LLM's ranking (Decision.ranking)"),
    )
}
FAST_SYSTEMS = tuple(n for n, s in SYSTEMS.items() if not s.needs_llm)
LLM_SYSTEMS = tuple(n for n, s in SYSTEMS.items() if s.needs_llm)
BASELINE = "default"


def resolve_systems(names: Iterable[str]) -> list[str]:
    """Known system names in the given order, without repeats; raises UnknownName with close matches."""
    out: list[str] = []
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        if name not in SYSTEMS:
            raise UnknownName("system", name, list(SYSTEMS))
        if name not in out:
            out.append(name)
    return out
