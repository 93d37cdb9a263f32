"""The rewrite validator: unit cases for each rule, then hypothesis properties over generated rewrites."""
from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from kernel.types import Ad, Copy
from agent.copy_validator import DEFAULT_BLOCKLIST, load_blocklist, validate_copy

AD = Ad(
    "a1",
    "Acme Trail Shoes - $49.00",
    "Save 20 % on our best trainers. Free shipping until Dec 25th, 2024. Risk-free returns for 30 days.",
    advertiser="Acme",
)


def check(headline: str, description: str, ad: Ad = AD, **kw) -> list[str]:
    return validate_copy(Copy(headline, description), ad, **kw).reasons


# --- unit cases -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headline", "description"),
    [
        ("Acme Trail Shoes for $49", "Save 20% on our best trainers, with free shipping."),
        ("Trail shoes at $49.00", "20 percent off our best trainers. Risk free returns for 30 days."),
        ("Trail Shoes: 49 dollars", "Free shipping until December 25. Returns within 30 days."),
        ("Acme trail shoes", "Free shipping until 2024-12-25 on trainers."),
        ("Acme trail shoes", "Order by Dec 25 for free shipping."),
        ("ACME TRAIL SHOES", "SAVE 20% ON OUR BEST TRAINERS."),
    ],
)
def test_grounded_rewrites_pass(headline, description):
    assert check(headline, description) == []


@pytest.mark.parametrize(
    ("headline", "description", "reason"),
    [
        ("", "Save 20% on trainers.", "empty"),
        ("Trail shoes", "   ", "empty"),
        ("A" * 31, "Save 20% on trainers.", "headline_too_long"),
        ("Trail shoes", "B" * 91, "description_too_long"),
        ("Trail shoes\n", "Save 20%", "invalid_char"),
        ("Trail\u200b shoes", "Save 20%", "invalid_char"),
        ("Trail shoes $39", "Save 20%", "ungrounded_number"),
        ("Trail shoes", "Save 25% on trainers.", "ungrounded_number"),
        ("Trail shoes", "Save $20 on trainers.", "ungrounded_number"),  # 20 is a percentage in the source
        ("Trail shoes", "Save €49 on trainers.", "ungrounded_number"),  # wrong currency
        ("Trail shoes", "Two pairs for the trail.", "ungrounded_number"),
        ("Trail shoes", "Over 10k happy runners.", "ungrounded_number"),
        ("Trail shoes", "Half price trainers.", "ungrounded_number"),
        ("Trail shoes", "Free shipping until Dec 26.", "ungrounded_date"),
        ("Trail shoes", "Free shipping until Dec 25, 2025.", "ungrounded_date"),
        ("Trail shoes", "Free shipping until 12/25.", "ungrounded_date"),
        ("Trail shoes", "Free shipping this Friday.", "ungrounded_date"),
        ("Trail shoes", "Free shipping ends today.", "ungrounded_date"),
        ("Trail shoes", "Sale ends in January.", "ungrounded_date"),
        ("Cheapest trail shoes", "Save 20% on trainers.", "ungrounded_claim"),
        ("Trail shoes", "Guaranteed comfort on trainers.", "ungrounded_claim"),
        ("#1 trail shoes", "Save 20% on trainers.", "ungrounded_claim"),
        ("No. 1 trail shoes", "Save 20% on trainers.", "ungrounded_claim"),
        ("Number one trail shoes", "Save 20% on trainers.", "ungrounded_claim"),
        ("Trail shoes", "100% waterproof trainers.", "ungrounded_claim"),
        ("Top-rated trail shoes", "Save 20%", "ungrounded_claim"),
        ("Trail shoes", "The only trainers you need.", "ungrounded_claim"),
        ("Trail shoes", "Never slip again.", "ungrounded_claim"),
        ("Trail shoes", "Unlimited returns.", "ungrounded_claim"),
        ("Trail shoes", "The lightest trainers.", "ungrounded_claim"),  # any -est superlative
        ("Trail shoes", "The FASTEST trainers.", "ungrounded_claim"),
        ("Trail shoes", "Best-selling trainers.", "ungrounded_claim"),  # 'best' alone is in the source
        ("Trail shoes", "Visit acme.com today", "url"),
        ("Trail shoes", "See https://acme.example/x", "url"),
        ("Trail shoes", "See www.acme-shoes.co.uk", "url"),
        ("Trail shoes", "Go to acme dot com", "url"),
        ("Trail shoes", "Mail sales@acme.com", "email"),
        ("Trail shoes", "Call (555) 123-4567", "phone"),
        ("Trail shoes", "Call +44 20 7946 0958", "phone"),
        ("Trail shoes", "Call 1-800-FLOWERS", "phone"),
        ("Trail shoes", "<b>Save 20%</b>", "html"),
        ("Trail shoes", "Save 20% &amp; more", "html"),
        ("Trail shoes", "<script src=x", "html"),
        ("Trail shoes", "Click here to save 20%", "blocked_term"),
        ("Trail shoes", "ACT   NOW and save 20%", "blocked_term"),
    ],
)
def test_violations_are_rejected(headline, description, reason):
    reasons = check(headline, description)
    assert reason in reasons, reasons


def test_risk_free_in_source_does_not_ground_bare_free():
    ad = Ad("a2", "Trail shoes", "Risk-free returns.")
    assert check("Trail shoes", "Free returns.", ad) == ["ungrounded_claim"]
    assert check("Trail shoes", "Risk free returns.", ad) == []


def test_source_superlatives_and_synonyms_ground_each_other():
    ad = Ad("a3", "The #1 running app", "Rated number one. 100% free to start.")
    assert check("No. 1 running app", "100 percent free to start.", ad) == []


def test_year_may_be_dropped_never_added():
    with_year = Ad("a4", "Sale", "Ends March 3, 2025.")
    no_year = Ad("a5", "Sale", "Ends March 3.")
    assert check("Sale", "Ends Mar 3rd", with_year) == []
    assert check("Sale", "Ends 3 March 2025", no_year) == ["ungrounded_date"]


def test_numbers_normalise():
    ad = Ad("a6", "Laptops from $1,299.00", "Save 15 percent, 10,000 sold, 4.5 stars, 49,99 € case.")
    assert check("Laptops from $1299", "Save 15%. 10k sold, 4.5 stars, €49.99 case.", ad) == []


def test_all_reasons_are_reported_once_in_rule_order():
    verdict = validate_copy(Copy("Cheapest " * 5, "Call 555-123-4567, see acme.com, <i>$5</i>, 9% off"), AD)
    assert not verdict.ok
    assert verdict.reasons == ["headline_too_long", "html", "url", "phone", "ungrounded_claim", "ungrounded_number"]
    assert any("cheapest" in d for d in verdict.details)


def test_custom_blocklist_whole_words(tmp_path: Path):
    blocklist = frozenset({"crypto", "get rich"})
    assert check("Trail shoes", "Pay with crypto", blocklist=blocklist) == ["blocked_term"]
    assert check("Trail shoes", "Get-rich trainers", blocklist=blocklist) == ["blocked_term"]
    assert check("Trail shoes", "Cryptography trainers", blocklist=blocklist) == []
    assert check("Trail shoes", "Click here", blocklist=frozenset()) == []
    path = tmp_path / "blocked.txt"
    path.write_text("# regulated\ncrypto\n\nloan shark  # comment\n")
    loaded = load_blocklist(path, extra=["casino"])
    assert {"crypto", "loan shark", "casino"} | DEFAULT_BLOCKLIST == loaded


def test_lengths_are_configurable():
    assert check("Trail shoes", "Save 20%", max_headline=5) == ["headline_too_long"]


NEWS = [  # news-style ads, as in the MIND-shaped demo catalog
    Ad("N1", "The 25 best pizza places in Chicago, ranked by locals", "Deep dish, tavern style and a few surprises from the suburbs."),
    Ad("N2", "The most reliable used SUVs under $20,000", "Consumer surveys point to three compact models that age well."),
    Ad("N3", "Stadium tour dates announced for next summer", "Tickets go on sale Friday with a presale for fan club members."),
]


def test_realistic_news_rewrites():
    by_title = {a.title: a for a in NEWS}
    pizza = by_title["The 25 best pizza places in Chicago, ranked by locals"]
    assert check("25 best pizza places: Chicago", "Deep dish, tavern style and suburban surprises, ranked by locals.", pizza) == []
    assert check("Chicago's 30 best pizzas", "Deep dish and tavern style.", pizza) == ["ungrounded_number"]
    suvs = by_title["The most reliable used SUVs under $20,000"]
    assert check("Reliable used SUVs under $20k", "Three compact models that age well.", suvs) == []
    assert check("Cheapest used SUVs", "Three compact models under $15,000.", suvs) == [
        "ungrounded_claim",
        "ungrounded_number",
    ]
    tour = by_title["Stadium tour dates announced for next summer"]
    assert check("Stadium tour dates announced", "Tickets on sale Friday, fan club presale first.", tour) == []
    assert check("Stadium tour dates announced", "Tickets on sale Monday.", tour) == ["ungrounded_date"]


# --- properties -----------------------------------------------------------------------------------

# Atoms: a source ad and every rewrite here are space-joined atoms. No two atoms combine into a new fact
# (no month names, no multi-word claim parts, at most one number of three or more digits), so any
# arrangement of the source's own atoms states nothing the source does not.
PLAIN = (
    "fresh coffee beans roasted daily shop our new range of shoes comfort style for you the and with home "
    "delivery organic tea garden tools quality local crafted simple modern design classic warm jackets kids books"
).split()
CLAIM_ATOMS = ["best", "free", "guaranteed", "#1", "cheapest", "fastest", "only", "never", "always", "100%",
               "risk-free", "top-rated", "unlimited", "lowest"]  # fmt: skip
NUMBER_ATOMS = ["$49.00", "20%", "12", "2024", "€15", "3.5"]
SOURCE_VALUES = {"49", "20", "12", "2024", "15", "3.5", "100", "1"}

atoms = st.sampled_from(PLAIN + CLAIM_ATOMS + NUMBER_ATOMS)
source_atoms = st.lists(atoms, min_size=2, max_size=25, unique=True)


def source_ad(words: list[str]) -> Ad:
    half = len(words) // 2
    return Ad("gen", " ".join(words[:half]), " ".join(words[half:]))


def fit(words: list[str], limit: int) -> str:
    out: list[str] = []
    for w in words:
        if len(" ".join([*out, w])) <= limit:
            out.append(w)
    return " ".join(out)


@st.composite
def source_and_rewrite(draw):
    words = draw(source_atoms)
    chosen = draw(st.permutations(words))
    split = draw(st.integers(1, len(chosen)))
    headline = fit(chosen[:split], 30) or fit(chosen, 30)
    description = fit(chosen[split:], 90) or fit(chosen, 90)
    assume(headline and description)
    return source_ad(words), Copy(headline, description)


@settings(max_examples=300, deadline=None)
@given(source_and_rewrite())
def test_rewrites_made_only_of_source_atoms_pass(case):
    ad, rewrite = case
    verdict = validate_copy(rewrite, ad)
    assert verdict.ok, (verdict.reasons, verdict.details, ad, rewrite)


@settings(max_examples=100, deadline=None)
@given(st.lists(atoms, min_size=1, max_size=20, unique=True))
def test_the_source_copy_itself_passes_when_it_fits(words):
    ad = source_ad(words)
    assume(ad.title and len(ad.title) <= 30 and 0 < len(ad.text) <= 90)
    assert validate_copy(Copy(ad.title, ad.text), ad).ok


absent_numbers = st.integers(0, 99_999).map(str).filter(lambda v: v not in SOURCE_VALUES)
number_formats = st.sampled_from(["{}", "${}", "{}%", "{} %", "${}.00", "{} dollars", "€{}", "{} percent"])


@settings(max_examples=300, deadline=None)
@given(source_atoms, absent_numbers, number_formats, st.booleans())
@example(["shoes", "$49.00"], "59", "${}", False)
@example(["shoes", "20%"], "25", "{} %", True)
def test_any_absent_number_is_rejected(words, value, fmt, in_headline):
    ad = source_ad(words)
    number = fmt.format(value)
    rest = [w for w in words if w in PLAIN][:3]
    headline, description = (number, " ".join(rest) or "shoes") if in_headline else ("shoes", " ".join([*rest, number]))
    verdict = validate_copy(Copy(headline, description), ad)
    assert "ungrounded_number" in verdict.reasons, (verdict, number)


@settings(max_examples=200, deadline=None)
@given(source_atoms, st.sampled_from(CLAIM_ATOMS + ["greatest", "newest", "number one", "world's", "proven"]))
def test_any_absent_claim_is_rejected(words, claim):
    assume(claim not in words)
    assume(not (claim == "number one" and "#1" in words))  # synonyms ground each other
    ad = source_ad(words)
    verdict = validate_copy(Copy("Shoes", f"{claim} shoes"), ad)
    assert "ungrounded_claim" in verdict.reasons, (verdict, claim, words)


VIOLATIONS = {
    "url": st.sampled_from(["acme.com", "https://x.io/p?q=1", "www.shop.net", "deals.shop", "acme dot com"]),
    "email": st.sampled_from(["a@b.co", "sales.team+ads@acme-shoes.com"]),
    "phone": st.sampled_from(["555-123-4567", "(555) 123 4567", "+1 555 123 4567", "+44 20 7946 0958", "0800 123 4567"]),
    "html": st.sampled_from(["<b>", "</p>", "<a href='x'>", "&nbsp;", "&#39;", "<img src=x onerror=y>"]),
    "blocked_term": st.sampled_from(sorted(DEFAULT_BLOCKLIST)),
    "ungrounded_date": st.sampled_from(["Jan 5", "on 3/14", "Friday", "tomorrow", "2031-01-02", "5th of June"]),
    "invalid_char": st.sampled_from(["\u200b", "\u202e", "\x00", "\t", "\ue000"]),
}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(source_and_rewrite(), st.sampled_from(sorted(VIOLATIONS)), st.data(), st.booleans())
def test_no_generated_violating_rewrite_passes(case, reason, data, in_headline):
    ad, rewrite = case
    bad = data.draw(VIOLATIONS[reason])
    glue = "" if reason == "invalid_char" else " "
    if in_headline:
        rewrite = Copy(f"{rewrite.headline}{glue}{bad}", rewrite.description)
    else:
        rewrite = Copy(rewrite.headline, f"{bad}{glue}{rewrite.description}")
    verdict = validate_copy(rewrite, ad)
    assert not verdict.ok
    assert reason in verdict.reasons, (verdict, bad)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=120), st.text(max_size=120), st.text(max_size=200))
def test_never_raises_and_ok_means_no_reasons(headline, description, source_text):
    verdict = validate_copy(Copy(headline, description), Ad("x", source_text[:60], source_text[60:]))
    assert verdict.ok == (verdict.reasons == [])
    assert len(set(verdict.reasons)) == len(verdict.reasons)


def test_word_lists_are_data_and_limits_are_the_schemas():
    from agent import copy_validator, schema
    from agent.reasons import ReviewReason
    from agent.textnorm import wordlist

    assert copy_validator.NOT_SUPERLATIVE == frozenset(wordlist("not_superlatives")) and "forest" in copy_validator.NOT_SUPERLATIVE
    assert copy_validator.CLAIMS["risk_free"][0] == r"risk[\s-]?free" and copy_validator._NUMBER_WORDS["dozen"] == "12"
    assert "shop" in wordlist("tlds") and not hasattr(copy_validator, "MAX_HEADLINE")
    assert check("H" * schema.HEADLINE_MAX, "D" * schema.DESCRIPTION_MAX) == []
    reasons = check("H" * (schema.HEADLINE_MAX + 1), "D" * (schema.DESCRIPTION_MAX + 1))
    assert reasons == ["headline_too_long", "description_too_long"] and all(isinstance(r, ReviewReason) for r in reasons)


def test_an_understood_ad_grounds_claims_only_in_its_extracted_claims():
    from agent.understanding import AdUnderstanding, Claim, with_understanding

    shoe = Ad("run-002", "Tempo Glide daily trainer", "A soft landing. Now $119 with free returns. Weighs 250 g.")
    record = AdUnderstanding(category="running shoes", claims=[Claim(kind="price", text="$119")], summary="A road running shoe.")
    understood = with_understanding(shoe, record)
    good, free, grams = Copy("Tempo Glide", "Now $119."), Copy("Tempo Glide", "Free returns."), Copy("Tempo Glide", "Weighs 250 g.")
    assert [validate_copy(c, shoe).ok for c in (good, free, grams)] == [True, True, True]  # all in the source text
    assert validate_copy(good, understood).ok
    assert validate_copy(free, understood).reasons == ["ungrounded_claim"]  # in the text, not an extracted claim
    assert validate_copy(grams, understood).reasons == ["ungrounded_number"]
    assert check("Tempo Glide", "Now $99.", with_understanding(shoe, record.model_copy(update={"claims": [Claim(kind="price", text="$99")]}))) == ["ungrounded_number"]
