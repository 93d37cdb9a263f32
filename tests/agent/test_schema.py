from __future__ import annotations

import json

import pytest

from kernel.errors import LLMOutputInvalid
from kernel.types import Copy
from agent.schema import DESCRIPTION_MAX, HEADLINE_MAX, build_output_schema, parse_llm_output

IDS = ["N1", "N2", "N3", "N4"]


def answer(**over: object) -> str:
    base: dict[str, object] = {
        "ranking": ["N3", "N1"],
        "justification": "You read about football; this sells tickets.",
        "headline": "Tickets for Sunday",
        "description": "Seats for the home stretch from $20.",
    }
    base.update(over)
    return json.dumps({k: v for k, v in base.items() if v is not ...})


def test_schema_restricts_ids_and_copy_lengths() -> None:
    schema = build_output_schema(IDS)
    props = schema["properties"]
    assert props["ranking"]["items"] == {"type": "string", "enum": IDS}
    assert props["ranking"]["maxItems"] == len(IDS) and props["ranking"]["minItems"] == 1
    assert props["headline"]["maxLength"] == HEADLINE_MAX == 30
    assert props["description"]["maxLength"] == DESCRIPTION_MAX == 90
    assert schema["required"] == ["ranking", "justification", "headline", "description"]
    assert schema["additionalProperties"] is False
    json.dumps(schema)  # serialisable as sent


def test_schema_without_rewrite_and_with_cap() -> None:
    schema = build_output_schema(IDS + ["N1"], rewrite=False, max_ranked=2)
    assert set(schema["properties"]) == {"ranking", "justification"}
    assert schema["properties"]["ranking"]["items"]["enum"] == IDS  # deduplicated
    assert schema["properties"]["ranking"]["maxItems"] == 2
    with pytest.raises(ValueError):
        build_output_schema([])


def test_parse_valid_answer() -> None:
    out = parse_llm_output(answer(), IDS)
    assert out.ranking == ["N3", "N1"]
    assert out.copy == Copy(headline="Tickets for Sunday", description="Seats for the home stretch from $20.")
    assert out.justification and out.dropped == 0 and out.copy_rejected is None


def test_a_raw_newline_inside_a_string_is_still_the_answer() -> None:
    """What SmolLM2 under llama.cpp's JSON grammar emitted on the demo (a raw newline inside the description):
    strict JSON refused it as malformed_json and the whole ranking was lost."""
    raw = '{"ranking": ["N3", "N1"], "justification": "Runs on Sundays.", "headline": "Tickets", "description": "Seats\n{"}'
    out = parse_llm_output(raw, IDS)
    assert out.ranking == ["N3", "N1"] and out.justification == "Runs on Sundays."


@pytest.mark.parametrize("raw", ["", "not json", '{"ranking": ["N1"', "Sure! The best ad is N1."])
def test_malformed_json_raises_with_raw(raw: str) -> None:
    with pytest.raises(LLMOutputInvalid) as exc:
        parse_llm_output(raw, IDS)
    assert exc.value.reason == "malformed_json" and exc.value.raw == raw


@pytest.mark.parametrize(
    "raw",
    [
        answer(ranking=...),
        answer(justification=...),
        answer(headline=...),
        answer(ranking="N1"),
        answer(ranking=[{"id": "N1"}]),
        json.dumps(["N1", "N2"]),
    ],
)
def test_missing_or_mistyped_fields_raise(raw: str) -> None:
    with pytest.raises(LLMOutputInvalid) as exc:
        parse_llm_output(raw, IDS)
    assert exc.value.reason == "schema_mismatch"


def test_copy_fields_optional_without_rewrite() -> None:
    out = parse_llm_output(answer(headline=..., description=...), IDS, require_copy=False)
    assert out.ranking == ["N3", "N1"] and out.copy is None and out.copy_rejected is None


def test_foreign_ids_and_repeats_are_dropped_and_counted() -> None:
    out = parse_llm_output(answer(ranking=["N2", "N9", "N2", "N4", "X", "N4", "N1"]), IDS)
    assert out.ranking == ["N2", "N4", "N1"]
    assert out.unknown_ids == ["N9", "X"] and out.repeats == 2 and out.dropped == 4
    assert out.copy is not None  # the top id was valid


def test_only_foreign_ids_is_invalid() -> None:
    with pytest.raises(LLMOutputInvalid) as exc:
        parse_llm_output(answer(ranking=["N9", "N10"]), IDS)
    assert exc.value.reason == "empty_ranking"


def test_foreign_top_id_discards_its_copy_and_justification() -> None:
    out = parse_llm_output(answer(ranking=["N9", "N2"]), IDS)
    assert out.ranking == ["N2"]
    assert out.copy is None and out.justification is None and out.copy_rejected == "top_id_dropped"


@pytest.mark.parametrize(
    ("over", "reason"),
    [
        ({"headline": "x" * (HEADLINE_MAX + 1)}, "headline_too_long"),
        ({"description": "y" * (DESCRIPTION_MAX + 1)}, "description_too_long"),
        ({"headline": "   "}, "empty"),
        ({"description": ""}, "empty"),
        ({"headline": None}, "copy_missing"),
    ],
)
def test_bad_copy_means_original_copy_not_error(over: dict[str, object], reason: str) -> None:
    out = parse_llm_output(answer(**over), IDS)
    assert out.ranking == ["N3", "N1"] and out.copy is None and out.copy_rejected == reason


def test_copy_at_the_limits_is_kept() -> None:
    out = parse_llm_output(answer(headline="h" * HEADLINE_MAX, description="d" * DESCRIPTION_MAX), IDS)
    assert out.copy == Copy(headline="h" * HEADLINE_MAX, description="d" * DESCRIPTION_MAX)


@pytest.mark.parametrize(
    "wrap",
    ["```json\n{}\n```", "```\n{}\n```", "  {}  ", "Here you go:\n{}\nHope this helps."],
)
def test_fences_and_surrounding_prose_are_tolerated(wrap: str) -> None:
    out = parse_llm_output(wrap.replace("{}", answer()), IDS)
    assert out.ranking == ["N3", "N1"]


def test_numeric_ids_unquoted() -> None:
    out = parse_llm_output(answer(ranking=[12, "7", 5]), ["5", "7", "12"])
    assert out.ranking == ["12", "7", "5"]


def test_parser_reasons_are_review_reasons() -> None:
    from agent.review import REVIEW_REASONS

    for raw in (answer(headline="x" * 31), answer(headline=None), answer(description=" "), answer(ranking=["N9", "N2"])):
        assert parse_llm_output(raw, IDS).copy_rejected in REVIEW_REASONS
