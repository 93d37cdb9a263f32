"""Deterministic checks on LLM-rewritten ad copy, before it may replace the advertiser's own copy.

    verdict = validate_copy(rewrite, ad)            # blocklist=DEFAULT_BLOCKLIST | your terms
    copy = rewrite if verdict.ok else original       # verdict.reasons: stable codes for logs/metrics

Rules (all are checked; every failing rule adds its reason once, in the order below):
- "empty", "headline_too_long" (> 30 chars), "description_too_long" (> 90 chars), "invalid_char"
  (control, format/zero-width, private-use characters).
- Never allowed, whatever the source says: "html" (tags, entities), "email", "url" (schemes, www.,
  bare domains, "x dot com"), "phone".
- "blocked_term": a blocklist term as a whole word or phrase (case-insensitive; space == hyphen).
- Grounding in the source ad's title + text: every claim ("best", "free", "#1", "risk-free", any
  other superlative ending in -est, ...) -> "ungrounded_claim"; every number, price, percentage
  and number word -> "ungrounded_number"; every date, month, weekday and "today"/"tomorrow"/"tonight"
  -> "ungrounded_date".

- An ad understood at ingest (agent.understanding: `Ad.metadata["understanding"]`) narrows the
  grounding: a claim or number of the rewrite must also be among the ad's extracted claims (prices,
  features, offers, each kept at ingest only if its text is in the ad), else the same two reasons. An
  ad without a record is checked against its title + text alone.

Grounding compares normalised facts, not text: "$49.00" == "$49" == "49 dollars", "20 %" == "20%"
== "20 percent", "10k" == "10,000", "Dec 25th" == "December 25" == "2024-12-25" (a rewrite may drop a
year the source has, never add one). A bare number is grounded by the same value of any kind, but a
price needs the same price and currency, a percentage the same percentage. Matching is on NFKC,
case-folded text with zero-width characters removed, so look-alike tricks do not slip through.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from pathlib import Path

from kernel.types import Ad, Copy

from .reasons import ReviewReason as R
from .schema import DESCRIPTION_MAX, HEADLINE_MAX
from .textnorm import bad_char as _bad_char
from .textnorm import normalise as _normalise
from .textnorm import wordlist
from .understanding import understanding_of

log = logging.getLogger(__name__)

# Reason codes (agent.reasons.ReviewReason, the one vocabulary of model-text refusals).
EMPTY = R.EMPTY
HEADLINE_TOO_LONG = R.HEADLINE_TOO_LONG
DESCRIPTION_TOO_LONG = R.DESCRIPTION_TOO_LONG
INVALID_CHAR = R.INVALID_CHAR
HTML = R.HTML
EMAIL = R.EMAIL
URL = R.URL
PHONE = R.PHONE
BLOCKED_TERM = R.BLOCKED_TERM
UNGROUNDED_CLAIM = R.UNGROUNDED_CLAIM
UNGROUNDED_NUMBER = R.UNGROUNDED_NUMBER
UNGROUNDED_DATE = R.UNGROUNDED_DATE

DEFAULT_BLOCKLIST: frozenset[str] = frozenset(
    {"click here", "act now", "miracle", "you have won", "you won", "shocking", "xxx", "nsfw"}
)


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    reasons: list[str]
    details: list[str] = field(default_factory=list)  # "reason: offending text", for logs only


# --- never-allowed content -------------------------------------------------------------------------

_TLDS = "|".join(wordlist("tlds"))
_HTML = re.compile(
    r"<\s*/?\s*[a-z][a-z0-9-]*(?:\s[^<>]*)?/?\s*>"
    r"|<\s*/?\s*(?:script|iframe|img|svg|style|a|b|i|p|div|span|br|link|meta|object|embed|form|input)\b"
    r"|&(?:[a-z][a-z0-9]{1,31}|#\d{1,7}|#x[0-9a-f]{1,6});"
)
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_URL = re.compile(
    r"(?:[a-z][a-z0-9+.-]*://|www\.)\S+"
    rf"|(?<![\w@.-])(?:[a-z0-9](?:[a-z0-9-]{{0,61}}[a-z0-9])?\.)+(?:{_TLDS})(?![\w-])(?:/\S*)?"
    rf"|\b[a-z0-9-]+\s*(?:\[dot\]|\(dot\)|\sdot\s)\s*(?:{_TLDS})\b"
)
_PHONE = re.compile(
    r"(?<![\w+])(?:"
    r"\+\d{1,3}[\s.-]?(?:\(\d{1,4}\)[\s.-]?)?\d{1,4}(?:[\s.-]?\d{2,4}){2,4}"  # international
    r"|\(?\d{3}\)?[\s.-]?\d{3}[\s.-]?\d{4}"  # North American
    r"|1[\s.-]?8(?:00|33|44|55|66|77|88)[\s.-]?[a-z0-9]{3}[\s.-]?[a-z0-9]{4}"  # toll-free, vanity
    r"|\d{3,5}[\s.-]\d{3,4}[\s.-]\d{3,4}"  # grouped national numbers
    r")(?!\w)"
)
_FORBIDDEN: tuple[tuple[str, re.Pattern[str]], ...] = ((HTML, _HTML), (EMAIL, _EMAIL), (URL, _URL), (PHONE, _PHONE))


# --- claims ----------------------------------------------------------------------------------------

# canonical claim -> patterns on normalised text (whole words; longer phrases win over their parts).
CLAIMS: dict[str, tuple[str, ...]] = {}
for _canon, _pattern in (line.split(None, 1) for line in wordlist("claims")):
    CLAIMS[_canon] = (*CLAIMS.get(_canon, ()), _pattern.strip())
# Any other word ending in -est is read as a superlative (cheapest, newest, ...) unless listed here.
NOT_SUPERLATIVE = frozenset(wordlist("not_superlatives"))

_claim_patterns = sorted(
    ((p, canon) for canon, pats in CLAIMS.items() for p in pats), key=lambda pc: len(pc[0]), reverse=True
)
_CLAIM = re.compile(r"(?<![\w#])(?:" + "|".join(f"({p})" for p, _ in _claim_patterns) + r")(?![\w%])")
_CLAIM_CANON = [canon for _, canon in _claim_patterns]
_EST = re.compile(r"(?<![\w-])[a-z]+est(?![\w-])")

# --- dates -----------------------------------------------------------------------------------------

_MONTHS = {
    "jan": 1, "feb": 2, "mar": 3, "apr": 4, "may": 5, "jun": 6,
    "jul": 7, "aug": 8, "sep": 9, "oct": 10, "nov": 11, "dec": 12,
}  # fmt: skip
_MON = (
    r"(jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?"
    r"|sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\.?"
)
_ORD = r"(?:st|nd|rd|th)?"
_YEAR = r"(?:,?\s+(\d{4}))?(?!\d)"
_DATE_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("iso", re.compile(r"(?<!\d)(\d{4})-(\d{1,2})-(\d{1,2})(?!\d)")),
    ("md", re.compile(rf"\b{_MON}\s+(\d{{1,2}}){_ORD}(?![\d\w]){_YEAR}")),
    ("dm", re.compile(rf"(?<!\d)(\d{{1,2}}){_ORD}\s+(?:of\s+)?{_MON}(?!\w){_YEAR}")),
    ("my", re.compile(rf"\b{_MON}\s+(\d{{4}})(?!\d)")),
    ("slash", re.compile(r"(?<![\d/.])(\d{1,2})/(\d{1,2})(?:/(\d{4}|\d{2}))?(?![\d/])")),
    ("dotted", re.compile(r"(?<![\d.])(\d{1,2})\.(\d{1,2})\.(\d{4}|\d{2})(?![\d.])")),
    ("month", re.compile(r"\b(january|february|march|april|june|july|august|september|october|november|december)\b")),
    ("weekday", re.compile(r"\b(monday|tuesday|wednesday|thursday|friday|saturday|sunday)s?\b")),
    ("relative", re.compile(r"\b(today|tonight|tomorrow)\b")),
)


@dataclass(frozen=True, slots=True)
class _Date:
    family: str  # "cal" (month/day/year), "slash", "weekday", "relative"
    a: object = None
    b: object = None
    c: object = None

    def grounded_by(self, other: _Date) -> bool:
        return self.family == other.family and all(
            mine is None or mine == theirs for mine, theirs in ((self.a, other.a), (self.b, other.b), (self.c, other.c))
        )


def _month(name: str) -> int:
    return _MONTHS[name[:3]]


def _year(s: str | None) -> int | None:
    if s is None:
        return None
    return int(s) + 2000 if len(s) == 2 else int(s)


def _to_date(kind: str, m: re.Match[str]) -> _Date:
    g = m.groups()
    if kind == "iso":
        return _Date("cal", int(g[1]), int(g[2]), int(g[0]))
    if kind == "md":
        return _Date("cal", _month(g[0]), int(g[1]), _year(g[2]))
    if kind == "dm":
        return _Date("cal", _month(g[1]), int(g[0]), _year(g[2]))
    if kind == "my":
        return _Date("cal", _month(g[0]), None, int(g[1]))
    if kind in ("slash", "dotted"):
        return _Date("slash", int(g[0]), int(g[1]), _year(g[2]))
    if kind == "month":
        return _Date("cal", _month(g[0]))
    return _Date(kind, g[0])  # weekday, relative


# --- numbers ---------------------------------------------------------------------------------------

_CUR_PRE = {"$": "usd", "us$": "usd", "usd": "usd", "€": "eur", "eur": "eur", "£": "gbp", "gbp": "gbp",
            "¥": "jpy", "jpy": "jpy", "₹": "inr", "inr": "inr", "cad": "cad", "aud": "aud"}  # fmt: skip
_CUR_POST = {"usd": "usd", "dollar": "usd", "dollars": "usd", "bucks": "usd", "$": "usd", "eur": "eur",
             "euro": "eur", "euros": "eur", "€": "eur", "gbp": "gbp", "£": "gbp", "cad": "cad", "aud": "aud"}  # fmt: skip
_MULT = {"k": 1000, "thousand": 1000, "m": 10**6, "mm": 10**6, "mn": 10**6, "million": 10**6,
         "bn": 10**9, "billion": 10**9}  # fmt: skip
_NUMBER = re.compile(
    r"(?:(?P<pre>us\$|[$€£¥₹]|\b(?:usd|eur|gbp|jpy|inr|cad|aud)\b)\s?)?"
    r"(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+,\d{2}(?![\d,])|\d+(?:\.\d+)?|\.\d+)"
    r"(?:\s?(?P<mult>k|mm|mn|m|bn|thousand|million|billion)\b)?"
    r"(?:\s?(?P<pct>%|percent\b|per\s?cent\b|pct\b)"
    r"|\s?(?P<post>(?:usd|eur|gbp|cad|aud|dollars?|euros?|bucks)\b|[$€£](?!\s?\d)))?"
)
_NUMBER_WORDS = dict(line.split() for line in wordlist("number_words"))
_NUMBER_WORD = re.compile(r"\b(" + "|".join(_NUMBER_WORDS) + r")\b")


def _decimal_str(num: str, mult: str | None) -> str:
    if re.fullmatch(r"\d+,\d{2}", num):
        num = num.replace(",", ".")
    try:
        value = Decimal(num.replace(",", "")) * _MULT.get(mult or "", 1)
    except InvalidOperation:
        return num
    return format(value.normalize(), "f")


# --- facts -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Facts:
    forbidden: tuple[tuple[str, str], ...]  # (reason, matched text)
    claims: frozenset[str]
    numbers: frozenset[tuple[str, str]]  # (kind: "num" | "pct" | currency code, normalised value)
    dates: tuple[_Date, ...]
    texts: dict[str, str]  # canonical claim / number / date -> first matched text, for details


def _blank(pattern: re.Pattern[str], text: str, found: list[re.Match[str]]) -> str:
    def sub(m: re.Match[str]) -> str:
        found.append(m)
        return " "

    return pattern.sub(sub, text)


@lru_cache(maxsize=8192)
def _facts(text: str) -> _Facts:
    t = _normalise(text)
    texts: dict[str, str] = {}
    forbidden: list[tuple[str, str]] = []
    for reason, pattern in _FORBIDDEN:
        found: list[re.Match[str]] = []
        t = _blank(pattern, t, found)
        forbidden += [(reason, m.group(0)) for m in found]

    claims: set[str] = set()
    found = []
    t = _blank(_CLAIM, t, found)
    for m in found:
        canon = _CLAIM_CANON[m.lastindex - 1]  # type: ignore[operator]
        claims.add(canon)
        texts.setdefault(canon, m.group(0))
    for m in _EST.finditer(t):
        word = m.group(0)
        if len(word) >= 5 and word not in NOT_SUPERLATIVE:
            claims.add(word)
            texts.setdefault(word, word)

    dates: list[_Date] = []
    for kind, pattern in _DATE_PATTERNS:
        found = []
        t = _blank(pattern, t, found)
        for m in found:
            d = _to_date(kind, m)
            dates.append(d)
            texts.setdefault(repr(d), m.group(0).strip())

    numbers: set[tuple[str, str]] = set()
    found = []
    t = _blank(_NUMBER, t, found)
    for m in found:
        value = _decimal_str(m["num"], m["mult"])
        if m["pct"]:
            kind = "pct"
        elif m["pre"] or m["post"]:
            kind = _CUR_PRE.get(m["pre"] or "") or _CUR_POST[m["post"]]
        else:
            kind = "num"
        numbers.add((kind, value))
        texts.setdefault(f"{kind}:{value}", m.group(0).strip())
    for m in _NUMBER_WORD.finditer(t):
        value = _NUMBER_WORDS[m.group(1)]
        numbers.add(("num", value))
        texts.setdefault(f"num:{value}", m.group(0))
    return _Facts(tuple(forbidden), frozenset(claims), frozenset(numbers), tuple(dates), texts)


def _number_grounded(kind: str, value: str, source: frozenset[tuple[str, str]]) -> bool:
    if kind == "num":
        return any(v == value for _, v in source)
    return (kind, value) in source


# --- blocklist -------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _blocklist_pattern(blocklist: frozenset[str]) -> re.Pattern[str] | None:
    terms = sorted({_normalise(t) for t in blocklist if _normalise(t)}, key=len, reverse=True)
    if not terms:
        return None
    alts = (r"[\s-]+".join(re.escape(w) for w in re.split(r"[\s-]+", term)) for term in terms)
    return re.compile(r"(?<!\w)(?:" + "|".join(alts) + r")(?!\w)")


def load_blocklist(path: Path | None = None, *, extra: Iterable[str] = ()) -> frozenset[str]:
    """DEFAULT_BLOCKLIST, plus the terms in `path` (one per line, '#' comments) and `extra`."""
    terms = set(DEFAULT_BLOCKLIST) | {t for t in extra if t.strip()}
    if path is not None:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                terms.add(line)
    return frozenset(terms)


# --- the validator ---------------------------------------------------------------------------------


def validate_copy(
    rewrite: Copy,
    source: Ad,
    *,
    blocklist: frozenset[str] = DEFAULT_BLOCKLIST,
    max_headline: int = HEADLINE_MAX,
    max_description: int = DESCRIPTION_MAX,
) -> Verdict:
    """Check `rewrite` of `source`'s copy; ok only when no rule fails (see module doc)."""
    reasons: list[str] = []
    details: list[str] = []

    def fail(reason: str, detail: str = "") -> None:
        if reason not in reasons:
            reasons.append(reason)
        if detail:
            details.append(f"{reason}: {detail}")

    headline, description = rewrite.headline, rewrite.description
    if not _normalise(headline) or not _normalise(description):
        fail(EMPTY)
    if len(headline) > max_headline:
        fail(HEADLINE_TOO_LONG, f"{len(headline)} > {max_headline}")
    if len(description) > max_description:
        fail(DESCRIPTION_TOO_LONG, f"{len(description)} > {max_description}")
    if any(_bad_char(c) for c in headline + description):
        fail(INVALID_CHAR)

    src = _facts(f"{source.title}\n{source.text}")
    record = understanding_of(source)
    extracted = _facts("\n".join(c.text for c in record.claims)) if record is not None else None
    blocked = _blocklist_pattern(frozenset(blocklist))
    found: dict[str, list[str]] = {}
    for text in (headline, description):
        facts = _facts(text)
        for reason, matched in facts.forbidden:
            found.setdefault(reason, []).append(matched)
        if blocked is not None:
            found.setdefault(BLOCKED_TERM, []).extend(m.group(0) for m in blocked.finditer(_normalise(text)))
        for claim in sorted(facts.claims - src.claims):
            found.setdefault(UNGROUNDED_CLAIM, []).append(facts.texts.get(claim, claim))
        if extracted is not None:
            for claim in sorted((facts.claims & src.claims) - extracted.claims):
                found.setdefault(UNGROUNDED_CLAIM, []).append(f"{facts.texts.get(claim, claim)} (not an extracted claim)")
        for kind, value in sorted(facts.numbers):
            if not _number_grounded(kind, value, src.numbers):
                found.setdefault(UNGROUNDED_NUMBER, []).append(facts.texts.get(f"{kind}:{value}", value))
            elif extracted is not None and not _number_grounded(kind, value, extracted.numbers):
                found.setdefault(UNGROUNDED_NUMBER, []).append(f"{facts.texts.get(f'{kind}:{value}', value)} (not an extracted claim)")
        for d in facts.dates:
            if not any(d.grounded_by(s) for s in src.dates):
                found.setdefault(UNGROUNDED_DATE, []).append(facts.texts.get(repr(d), d.family))
    for reason in (HTML, EMAIL, URL, PHONE, BLOCKED_TERM, UNGROUNDED_CLAIM, UNGROUNDED_NUMBER, UNGROUNDED_DATE):
        for matched in found.get(reason, []):
            fail(reason, repr(matched))

    verdict = Verdict(ok=not reasons, reasons=reasons, details=details)
    if not verdict.ok:
        log.debug("rewrite rejected", extra={"ad_id": source.ad_id, "reasons": reasons})
    return verdict
