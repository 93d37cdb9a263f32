"""Why model text was not served: the one vocabulary of the parser, the prompt-echo check, the copy
validator and the text guard. `agent.review.Verdict.reasons` carries these names to the decision's
`copy_rejections`, the audit line, the metrics label and the eval report.

A reason about the rewrite (the copy) is the check's name; a reason about the justification is the
check's name prefixed with `justification_`. Only the checks that read free text apply to both.
(Kept in a module of its own so that the checks can name their reasons without importing the reviewer.)
"""
from __future__ import annotations

from enum import StrEnum


class ReviewReason(StrEnum):
    # the parser (agent.schema): the answer carried no usable rewrite
    COPY_MISSING = "copy_missing"  # headline or description missing (null) in an answer that had to carry them
    TOP_ID_DROPPED = "top_id_dropped"  # the model's first id was not a candidate: its text describes no served ad
    # the copy validator (agent.copy_validator), rewrite only
    EMPTY = "empty"
    HEADLINE_TOO_LONG = "headline_too_long"
    DESCRIPTION_TOO_LONG = "description_too_long"
    INVALID_CHAR = "invalid_char"
    HTML = "html"
    EMAIL = "email"
    URL = "url"
    PHONE = "phone"
    BLOCKED_TERM = "blocked_term"
    UNGROUNDED_CLAIM = "ungrounded_claim"
    UNGROUNDED_NUMBER = "ungrounded_number"
    UNGROUNDED_DATE = "ungrounded_date"
    # the reranker's prompt-echo check: the text repeats the system prompt's instructions
    COPY_PROMPT_ECHO = "copy_prompt_echo"
    JUSTIFICATION_PROMPT_ECHO = "justification_prompt_echo"
    # the text guard (agent.text_guard), rewrite (bare) and justification (prefixed)
    FOREIGN_CODE = "foreign_code"  # a code-like token (ZX91, SAVE20) not in the served ad's title
    LINK_OR_MARKUP = "link_or_markup"  # ://, www., @, <>{}[] (the copy validator's url/email/html cover copy)
    UNTRUSTED_WORD = "untrusted_word"  # repeats a word of untrusted text that is not a fact of the served ad
    INSTRUCTION_ECHO = "instruction_echo"  # speaks to or as a model: role lines, "ignore previous ...", delimiters
    JUSTIFICATION_FOREIGN_CODE = "justification_foreign_code"
    JUSTIFICATION_LINK_OR_MARKUP = "justification_link_or_markup"
    JUSTIFICATION_UNTRUSTED_WORD = "justification_untrusted_word"
    JUSTIFICATION_INSTRUCTION_ECHO = "justification_instruction_echo"


JUSTIFICATION_PREFIX = "justification_"
GUARD_REASONS = frozenset(
    {ReviewReason.FOREIGN_CODE, ReviewReason.LINK_OR_MARKUP, ReviewReason.UNTRUSTED_WORD, ReviewReason.INSTRUCTION_ECHO}
)


def for_justification(reason: str) -> ReviewReason:
    """The name of a free-text check's reason when it refused the justification."""
    return ReviewReason(JUSTIFICATION_PREFIX + reason)
