"""`adselect eval export-sft`: logged impressions with clicks → chat-format JSONL for fine-tuning the served model.

Each example is the prompt the service sends for that impression, rendered by the same code
(the Selector's prior stage picks and orders the candidates, `Selector._llm_args` the ones sent,
`LLMReranker.prepare` / `LLMScorer.prepare` render prompts/), plus the answer the service parses, made
from the click:

* listwise (`prompts/rerank.yaml`, ranking only, as on the hot path): `{"ranking": [clicked ids in
  sent order, then the other sent ids in sent order], "justification": ""}`, cut at `llm_max_ranked`,
  ids as the model sees them (aliases when `llm_alias_ids`);
* score (`prompts/score.yaml`): the label letter of the first clicked sent ad, one example per shown
  order (the P shown orders the service averages: rotations of a canonical order, agent.scorer.permutations), so the target
  moves with the ad and not with the position.

An impression is skipped (counted by reason) when no clicked ad is among the ads the service would
send the LLM (`clicked_not_sent`), when it has no click in the catalog (`no_click`), or when it has
no candidate (`no_candidates`).

Split, by user: `valid` if int(sha256(f"{seed}:{user_id}")[:16], 16) / 2**64 < valid_share, else
`train`; every impression of a user lands in the same file, so no user is in both. The same
(seed, share) gives the same split on any machine.

Files: DIR/train.jsonl, DIR/valid.jsonl (one {"messages": [...system, user, assistant]} per line, the
TRL/OpenAI chat format, plus "meta": impression and user ids, split), DIR/manifest.json (counts,
split rule, mode, prompt name/version/sha256, model, inputs' sha256).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kernel.types import SelectRequest
from eval.data import EvalImpression

log = logging.getLogger(__name__)

Mode = Literal["listwise", "score"]
SPLITS = ("train", "valid")


def user_split(user_id: str, *, valid_share: float, seed: int = 0) -> str:
    """"valid" or "train" for this user (the rule in the module doc)."""
    h = int(hashlib.sha256(f"{seed}:{user_id}".encode()).hexdigest()[:16], 16)
    return "valid" if h / 2**64 < valid_share else "train"


def service_request(imp: EvalImpression, *, k: int) -> SelectRequest:
    """The request the service would get for this impression (ranking only: copy is not trained)."""
    return SelectRequest(
        user_id=imp.user_id, history=imp.history, candidates=imp.candidates, k=k, use_llm=True, rewrite=False,
        request_id=imp.impression_id,
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class SFTExample:
    messages: list[dict[str, str]]  # the prompt, then {"role": "assistant", "content": target}
    impression_id: str
    user_id: str

    def to_json(self, split: str) -> str:
        meta = {"impression_id": self.impression_id, "user_id": self.user_id, "split": split}
        return json.dumps({"messages": self.messages, "meta": meta}, ensure_ascii=False)


def listwise_target(shown_ids: list[str], real_ids: list[str], clicked: frozenset[str], *, max_ranked: int | None) -> str | None:
    """The listwise answer for a click: clicked ids first (sent order), then the rest; None if none was sent."""
    first = [s for s, r in zip(shown_ids, real_ids, strict=True) if r in clicked]
    if not first:
        return None
    ranking = first + [s for s, r in zip(shown_ids, real_ids, strict=True) if r not in clicked]
    return json.dumps({"ranking": ranking[: max_ranked or len(ranking)], "justification": ""}, ensure_ascii=False)


def examples_for(imp: EvalImpression, *, selector, prompter, mode: Mode, skipped: Counter[str]) -> list[SFTExample]:
    """The examples of one impression (none when it is skipped; the reason is counted in `skipped`)."""
    if not imp.clicked:
        skipped["no_click"] += 1
        return []
    req = service_request(imp, k=selector.llm_max_candidates)
    stage = selector.prior_stage(req)
    if not stage.candidates:
        skipped["no_candidates"] += 1
        return []
    args = selector._llm_args(req, stage)  # the service's own choice of what the LLM is sent
    out: list[SFTExample] = []
    if mode == "listwise":
        call = prompter.prepare(**args)
        target = listwise_target(call.shown_ids, call.candidate_ids, imp.clicked, max_ranked=prompter.max_ranked)
        if target is not None:
            out.append(SFTExample([*call.messages, {"role": "assistant", "content": target}], imp.impression_id, imp.user_id))
    else:
        calls = prompter.prepare(
            history_ads=args["history_ads"], events=args["events"], candidates=args["candidates"], seed_key=req.request_id
        )  # fmt: skip
        for call in calls:
            picked = next((lab for lab, ad_id in zip(call.labels, call.order, strict=True) if ad_id in imp.clicked), None)
            if picked is None:
                break
            out.append(SFTExample([*call.messages, {"role": "assistant", "content": picked}], imp.impression_id, imp.user_id))
    if not out:
        skipped["clicked_not_sent"] += 1
    return out


def write_sft(
    items: Iterable[EvalImpression],
    *,
    selector,
    prompter,
    mode: Mode,
    out_dir: Path,
    valid_share: float,
    seed: int = 0,
    manifest: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write DIR/train.jsonl, DIR/valid.jsonl and DIR/manifest.json (temp files renamed when complete)."""
    if not 0 <= valid_share < 1:
        raise ValueError("valid_share must be in [0, 1)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    skipped: Counter[str] = Counter()
    counts = {s: {"examples": 0, "impressions": 0, "users": set()} for s in SPLITS}
    tmp = {s: out_dir / f".{s}.jsonl.{os.getpid()}.tmp" for s in SPLITS}
    fhs = {s: tmp[s].open("w", encoding="utf-8") for s in SPLITS}
    n = 0
    try:
        for imp in items:
            n += 1
            examples = examples_for(imp, selector=selector, prompter=prompter, mode=mode, skipped=skipped)
            if not examples:
                continue
            split = user_split(imp.user_id, valid_share=valid_share, seed=seed)
            for ex in examples:
                fhs[split].write(ex.to_json(split) + "\n")
            c = counts[split]
            c["examples"] += len(examples)
            c["impressions"] += 1
            c["users"].add(imp.user_id)
    finally:
        for fh in fhs.values():
            fh.close()
    for s in SPLITS:
        os.replace(tmp[s], out_dir / f"{s}.jsonl")
    summary = {
        "mode": mode,
        "impressions_read": n,
        "skipped": dict(skipped),
        "splits": {s: {"examples": c["examples"], "impressions": c["impressions"], "users": len(c["users"])} for s, c in counts.items()},
        "split_rule": f"valid if int(sha256('{seed}:' + user_id)[:16], 16) / 2**64 < {valid_share}, else train (by user)",
        "prompt": prompter.prompt.info(),
        "llm_max_candidates": selector.llm_max_candidates,
        **(manifest or {}),
    }
    (out_dir / "manifest.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    log.info("sft export", extra={k: v for k, v in summary.items() if k in ("mode", "impressions_read", "skipped")})
    return summary


def make_prompter(settings, *, mode: Mode):
    """The service's prompt renderer for `mode`, from the same settings (no LLM client: export only renders)."""
    if mode == "listwise":
        from agent.reranker import LLMReranker

        return LLMReranker.from_settings(settings, None)  # type: ignore[arg-type]
    from agent.scorer import LLMScorer

    return LLMScorer.from_settings(settings, None)  # type: ignore[arg-type]


def export_sft(
    *,
    settings,
    ads_path: Path,
    impressions_path: Path,
    out_dir: Path,
    mode: Mode,
    train_paths: list[Path] | None = None,
    weights_path: Path | None = None,
    valid_share: float = 0.1,
    seed: int = 0,
    limit: int | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """The eval environment over the catalog and training histories (as `adselect eval run` builds it),
    then `write_sft` over the impressions file."""
    from eval.data import load_impressions
    from eval.env import prepare_env
    from eval.provenance import file_sha256

    n_llm = settings.llm_candidates(bundled_model=not settings.llm_url)
    s = settings.model_copy(update={"llm_max_candidates": n_llm})
    train = list(train_paths or []) or [impressions_path]
    env = prepare_env(s, ads_path=ads_path, train_paths=train, weights_path=weights_path, show_progress=show_progress)
    try:
        loaded = load_impressions(impressions_path, catalog=env.services.index.row, limit=limit)
        return write_sft(
            _progress(loaded.items, show_progress), selector=env.services.selector, prompter=make_prompter(env.settings, mode=mode),
            mode=mode, out_dir=out_dir, valid_share=valid_share, seed=seed,
            manifest={
                "model": s.llm_model,
                "inputs": {"ads": file_sha256(ads_path), "impressions": file_sha256(impressions_path),
                           "train": [file_sha256(p) for p in train]},
                "load_skipped": loaded.skipped,
            },
        )  # fmt: skip
    finally:
        env.services.close()


def _progress(items: list[EvalImpression], enabled: bool) -> Iterator[EvalImpression]:
    from tqdm import tqdm

    yield from tqdm(items, desc="export-sft", unit="imp", disable=not enabled)
