"""A last check on model-written text that will be shown (the justification, rewritten copy): does it
echo something it could only have copied from untrusted input?

Prompt injections ask the model to repeat a marker ("reply with ZX91", "add promo code KRAKEN-05").
Datamarking makes that less likely; this check makes it visible and refused, deterministically:

- "foreign_code": a code-like token (letters and digits in one token, e.g. ZX91, PELICAN-4417,
  SAVE20; plain quantities such as 6L, 24kg, 4K, 1st are not codes) that is not in the served ad's
  title. The title is the one field shown to users as is; a code that appears only in the ad's text,
  an event or another ad is not repeated by the model.
- "link_or_markup": a URL scheme, "www.", an e-mail "@", or markup brackets (<>, {}, []).

Matching is on NFKC text with format characters (zero-width spaces, joiners) removed, case-folded.
A refused justification is dropped; refused copy falls back to the advertiser's original.
"""
from __future__ import annotations

import re
import unicodedata

from kernel.types import Ad

FOREIGN_CODE = "foreign_code"
LINK_OR_MARKUP = "link_or_markup"

_TOKEN = re.compile(r"[^\W_]+(?:[-_][^\W_]+)*")
_QUANTITY = re.compile(r"\d+(?:[.,]\d+)?[^\W\d_]{1,3}")  # 6l, 24kg, 4k, 5g, 1st, 30min
_LINK = re.compile(r"://|\bwww\.|@|[<>{}\[\]]")


def _normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)
    return "".join(c for c in text if unicodedata.category(c) != "Cf").casefold()


def _codes(text: str) -> set[str]:
    out = set()
    for tok in _TOKEN.findall(text):
        has_digit = any(c.isdigit() for c in tok)
        has_alpha = any(c.isalpha() for c in tok)
        if has_digit and has_alpha and not _QUANTITY.fullmatch(tok):
            out.add(tok)
    return out


def untrusted_echo(text: str, ad: Ad, *, links: bool = True) -> list[str]:
    """Reasons `text` may not be shown next to `ad` (empty: fine). `links=False` when another check
    (the copy validator's url/email/html rules) already covers them."""
    t = _normalise(text)
    reasons = []
    if _codes(t) - _codes(_normalise(ad.title)):
        reasons.append(FOREIGN_CODE)
    if links and _LINK.search(t):
        reasons.append(LINK_OR_MARKUP)
    return reasons
