"""The LLM's output contract: a per-request JSON schema, and a parser that turns raw text into valid data.

The schema restricts ranking items to the request's candidate ids, so a serving engine with
structured outputs cannot emit a foreign id. The parser still assumes nothing: ids outside the
candidates and repeats are dropped (and counted), copy that breaks the length limits is discarded
(the original copy is served), and only unusable output (not JSON, wrong shape, no valid id) raises.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from kernel.errors import LLMOutputInvalid
from kernel.types import Copy

from .reasons import ReviewReason

logger = logging.getLogger(__name__)

# The limits of model text (the schema sends them; the parser and the copy validator enforce them).
HEADLINE_MAX = 30
DESCRIPTION_MAX = 90
JUSTIFICATION_MAX = 240


def build_output_schema(
    candidate_ids: Sequence[str], *, rewrite: bool = True, max_ranked: int | None = None
) -> dict[str, Any]:
    """JSON schema of the answer for these candidates; copy fields only when `rewrite`.

    `max_ranked` caps the ranking's length (fewer ids to generate = lower latency); default: all.
    """
    ids = list(dict.fromkeys(candidate_ids))
    if not ids:
        raise ValueError("build_output_schema needs at least one candidate id")
    if max_ranked is not None and max_ranked < 1:
        raise ValueError("max_ranked must be >= 1")
    properties: dict[str, Any] = {
        "ranking": {
            "type": "array",
            "items": {"type": "string", "enum": ids},
            "minItems": 1,
            "maxItems": min(len(ids), max_ranked or len(ids)),
        },
        "justification": {"type": "string", "maxLength": JUSTIFICATION_MAX},
    }
    if rewrite:
        properties["headline"] = {"type": "string", "maxLength": HEADLINE_MAX}
        properties["description"] = {"type": "string", "maxLength": DESCRIPTION_MAX}
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


class _RawOutput(BaseModel):
    """The answer's shape before id and length checks (those are done by hand, to drop rather than fail)."""

    model_config = ConfigDict(extra="ignore")

    ranking: list[str]
    justification: str | None
    headline: str | None = None
    description: str | None = None

    @field_validator("ranking", mode="before")
    @classmethod
    def _ids_as_text(cls, v: Any) -> Any:
        # Numeric-looking ids sometimes come back unquoted.
        if isinstance(v, list):
            return [str(x) if isinstance(x, int) and not isinstance(x, bool) else x for x in v]
        return v


@dataclass(slots=True)
class ParsedOutput:
    ranking: list[str]  # subset of the candidate ids, no repeats, best first (never empty)
    justification: str | None
    copy: Copy | None  # for ranking[0]; None = serve the original copy
    unknown_ids: list[str] = field(default_factory=list)  # dropped: not among the candidates
    repeats: int = 0  # dropped: ids already ranked
    # why copy is None when it was asked for (agent.reasons): copy_missing | empty | headline_too_long |
    # description_too_long | top_id_dropped
    copy_rejected: ReviewReason | None = None

    @property
    def dropped(self) -> int:
        return len(self.unknown_ids) + self.repeats


_FENCE = re.compile(r"^```[A-Za-z0-9_-]*\s*\n?(.*?)\n?```\s*$", re.DOTALL)


def _load_json(raw: str) -> Any:
    text = raw.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    # strict=False: a raw newline or tab inside a string (what llama.cpp's JSON grammar lets a small model
    # emit) is still the object it meant; the copy review screens the text itself
    try:
        return json.loads(text, strict=False)
    except json.JSONDecodeError:
        pass
    start = text.find("{")  # prose around the object: take the first complete object
    if start >= 0:
        try:
            obj, _ = json.JSONDecoder(strict=False).raw_decode(text[start:])
            return obj
        except json.JSONDecodeError:
            pass
    raise LLMOutputInvalid("malformed_json", raw=raw, detail=f"not JSON: {raw[:80]!r}")


def _copy(headline: str | None, description: str | None) -> tuple[Copy | None, ReviewReason | None]:
    if headline is None or description is None:
        return None, ReviewReason.COPY_MISSING
    h, d = " ".join(headline.split()), " ".join(description.split())
    if not h or not d:
        return None, ReviewReason.EMPTY
    if len(h) > HEADLINE_MAX:
        return None, ReviewReason.HEADLINE_TOO_LONG
    if len(d) > DESCRIPTION_MAX:
        return None, ReviewReason.DESCRIPTION_TOO_LONG
    return Copy(headline=h, description=d), None


def parse_llm_output(
    raw: str, candidate_ids: Sequence[str], *, require_copy: bool = True, target_id: str | None = None
) -> ParsedOutput:
    """Validate the model's answer against the candidates.

    Raises LLMOutputInvalid for text that is not a JSON object, misses `ranking`/`justification`
    (or `headline`/`description` when `require_copy`), has wrongly typed fields, or names no
    candidate at all. Everything else is repaired: foreign ids and repeats are dropped, bad copy
    becomes None. When the model's first id is dropped, its copy and justification describe an ad
    we will not serve, so both become None — unless the prompt named a `target_id`: then copy and
    justification were asked for that candidate, whatever the model ranks first.
    """
    obj = _load_json(raw)
    if not isinstance(obj, dict):
        raise LLMOutputInvalid("schema_mismatch", raw=raw, detail=f"expected an object, got {type(obj).__name__}")
    if require_copy:
        missing = [k for k in ("headline", "description") if k not in obj]
        if missing:
            raise LLMOutputInvalid("schema_mismatch", raw=raw, detail=f"missing {missing}")
    try:
        out = _RawOutput.model_validate(obj)
    except ValidationError as e:
        detail = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()[:3])
        raise LLMOutputInvalid("schema_mismatch", raw=raw, detail=detail) from e

    allowed = set(candidate_ids)
    ranking: list[str] = []
    unknown: list[str] = []
    repeats = 0
    for cid in out.ranking:
        cid = cid.strip()
        if cid not in allowed:
            unknown.append(cid)
        elif cid in ranking:
            repeats += 1
        else:
            ranking.append(cid)
    if not ranking:
        raise LLMOutputInvalid("empty_ranking", raw=raw, detail=f"no candidate id among {out.ranking[:5]}")

    top_ok = out.ranking[0].strip() == ranking[0]
    justification = " ".join((out.justification or "").split())[:JUSTIFICATION_MAX] or None
    copy, rejected = _copy(out.headline, out.description) if require_copy else (None, None)
    if not top_ok and target_id is None:
        justification = None
        if require_copy:
            copy, rejected = None, ReviewReason.TOP_ID_DROPPED
    if unknown or repeats or rejected:
        logger.info(
            "llm output repaired",
            extra={"unknown_ids": len(unknown), "repeats": repeats, "copy_rejected": rejected},
        )
    return ParsedOutput(
        ranking=ranking,
        justification=justification,
        copy=copy,
        unknown_ids=unknown,
        repeats=repeats,
        copy_rejected=rejected,
    )
