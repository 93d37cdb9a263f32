"""One review of model text: may this justification and this rewrite be served next to this ad?

    reviewer = ModelTextReviewer.from_settings(settings)                # the copy blocklist from settings
    verdict = reviewer.review(llm_result, ad, rewrite=req.rewrite, untrusted=[*history_ads, *sent_ads, *events])
    justification = verdict.justification                              # None: not shown
    copy = verdict.copy or original_copy(ad)                           # None: the advertiser's copy
    copy_rejections.extend(verdict.reasons)                            # agent.reasons.ReviewReason names

`ad` is the ad the text was written for (`llm_result.copy_for`); `untrusted` is every ad and event the
model was shown (the served ad may be among them). The verdict's reasons come from, in this order:

1. the parser (agent.schema), carried on the result: `copy_missing`, `empty`, `headline_too_long`,
   `description_too_long`, `top_id_dropped` (only when a rewrite was asked for);
2. the reranker's checks, carried on `llm_result.refusals`: `justification_prompt_echo`,
   `copy_prompt_echo` (the text repeats the system prompt), `justification_untrusted_word`,
   `untrusted_word` (checked there against what the model was shown; see `screen`);
3. the text guard (agent.text_guard) on the justification: `justification_foreign_code`,
   `justification_link_or_markup`, `justification_untrusted_word`, `justification_instruction_echo`;
4. the copy validator (agent.copy_validator) and the text guard on the rewrite: `empty`,
   `headline_too_long`, `description_too_long`, `invalid_char`, `html`, `email`, `url`, `phone`,
   `blocked_term`, `ungrounded_claim`, `ungrounded_number`, `ungrounded_date`, `foreign_code`,
   `untrusted_word`, `instruction_echo`.

REVIEW_REASONS is that vocabulary (agent.reasons.ReviewReason); a name appears once per verdict.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kernel.types import Ad, Copy, LLMResult

from .copy_validator import DEFAULT_BLOCKLIST, load_blocklist, validate_copy
from .reasons import GUARD_REASONS, JUSTIFICATION_PREFIX, ReviewReason, for_justification
from .schema import DESCRIPTION_MAX, HEADLINE_MAX
from .text_guard import Untrusted, provenance, untrusted_echo
from .textnorm import words

if TYPE_CHECKING:
    from kernel.settings import Settings

log = logging.getLogger(__name__)

REVIEW_REASONS: frozenset[str] = frozenset(ReviewReason)
__all__ = ["REVIEW_REASONS", "JUSTIFICATION_PREFIX", "ModelTextReviewer", "ReviewReason", "Verdict", "echoes_prompt", "screen"]


@dataclass(frozen=True, slots=True)
class Verdict:
    justification: str | None  # the justification that may be shown, or None
    copy: Copy | None  # the rewrite that may be served, or None (serve the advertiser's copy)
    reasons: tuple[ReviewReason, ...]  # why anything was refused, in the order of the module doc

    @property
    def ok(self) -> bool:
        return not self.reasons


def echoes_prompt(text: str | None, instructions: str, *, min_words: int = 4) -> bool:
    """True when `text` repeats a run of the instructions (small models often answer with the field's
    description, e.g. "one sentence tying the user's history to the target ad"): such text is not copy."""
    if not text:
        return False
    said = words(text)
    inst = " " + " ".join(words(instructions)) + " "
    if len(said) < min_words:
        return len(said) >= 2 and " " + " ".join(said) + " " in inst
    n = min_words
    return any(" " + " ".join(said[i : i + n]) + " " in inst for i in range(len(said) - n + 1))


def screen(
    justification: str | None,
    copy: Copy | None,
    *,
    instructions: str,
    ad: Ad | None,
    untrusted: Sequence[Untrusted] = (),
) -> tuple[str | None, Copy | None, list[ReviewReason]]:
    """The checks that need what the model was shown (its system prompt, the ads and events): the
    reranker runs them on its answer. Returns what may be kept and the refusals."""
    refusals: list[ReviewReason] = []
    if echoes_prompt(justification, instructions):
        justification = None
        refusals.append(ReviewReason.JUSTIFICATION_PROMPT_ECHO)
    if copy is not None and (echoes_prompt(copy.headline, instructions) or echoes_prompt(copy.description, instructions)):
        copy = None
        refusals.append(ReviewReason.COPY_PROMPT_ECHO)
    if ad is not None and (justification or copy is not None):
        prov = provenance(ad, untrusted)
        if justification and prov.echoed(justification):
            justification = None
            refusals.append(ReviewReason.JUSTIFICATION_UNTRUSTED_WORD)
        if copy is not None and prov.echoed(f"{copy.headline}\n{copy.description}"):
            copy = None
            refusals.append(ReviewReason.UNTRUSTED_WORD)
    return justification, copy, refusals


class ModelTextReviewer:
    """Decides, deterministically, whether model text may be served (see the module doc)."""

    def __init__(
        self,
        *,
        blocklist: frozenset[str] = DEFAULT_BLOCKLIST,
        max_headline: int = HEADLINE_MAX,
        max_description: int = DESCRIPTION_MAX,
    ):
        self.blocklist = frozenset(blocklist)
        self.max_headline = max_headline
        self.max_description = max_description

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelTextReviewer:
        return cls(blocklist=load_blocklist(settings.copy_blocklist_path))

    def check_copy(self, copy: Copy, ad: Ad, *, untrusted: Sequence[Untrusted] = ()) -> list[ReviewReason]:
        """Why `copy` may not replace `ad`'s own copy (empty: it may)."""
        verdict = validate_copy(
            copy, ad, blocklist=self.blocklist, max_headline=self.max_headline, max_description=self.max_description
        )
        reasons = [ReviewReason(r) for r in verdict.reasons]
        return reasons + untrusted_echo(f"{copy.headline}\n{copy.description}", ad, links=False, untrusted=untrusted)

    def check_text(self, text: str, ad: Ad, *, untrusted: Sequence[Untrusted] = ()) -> list[ReviewReason]:
        """Why free `text` (a justification) may not be shown with `ad`, by the check's bare name."""
        return untrusted_echo(text, ad, untrusted=untrusted)

    def review(
        self, llm_result: LLMResult, ad: Ad, *, rewrite: bool, untrusted: Sequence[Untrusted] = ()
    ) -> Verdict:
        """The verdict on `llm_result`'s justification and copy, written for `ad`."""
        reasons: list[ReviewReason] = []
        if rewrite and llm_result.copy_rejected:
            reasons.append(ReviewReason(llm_result.copy_rejected))
        reasons += [ReviewReason(r) for r in llm_result.refusals]
        justification = llm_result.justification
        if justification:
            refused = self.check_text(justification, ad, untrusted=untrusted)
            if refused:
                justification = None
                reasons += [for_justification(r) for r in refused if r in GUARD_REASONS]
        copy = None
        if rewrite and llm_result.copy is not None:
            problems = self.check_copy(llm_result.copy, ad, untrusted=untrusted)
            if problems:
                reasons += problems
            else:
                copy = llm_result.copy
        verdict = Verdict(justification, copy, tuple(dict.fromkeys(reasons)))
        if verdict.reasons:
            log.debug("model text refused", extra={"ad_id": ad.ad_id, "reasons": [str(r) for r in verdict.reasons]})
        return verdict
