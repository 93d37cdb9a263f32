"""Ads and candidates for agent tests: realistic news-style titles and texts, ids shaped like MIND's."""
from __future__ import annotations

import pytest

from kernel.types import Ad, Candidate

_ROWS = [
    ("sports", "NFL playoff picture: who is in, who is out after Week 12", "Three division leaders clinched early while the wild-card race tightened."),
    ("sports", "Patriots rally late to beat the Cowboys in a snowy Foxborough", "A fourth-quarter touchdown sealed a comeback win in heavy snow."),
    ("sports", "Season tickets for the home stretch: what fans pay this year", "Prices for the last six home games rose by a fifth on the resale market."),
    ("sports", "The best running shoes for winter training, tested by coaches", "Grip, warmth and cushioning compared across twelve models."),
    ("foodanddrink", "The 25 best pizza places in Chicago, ranked by locals", "Deep dish, tavern style and a few surprises from the suburbs."),
    ("foodanddrink", "Easy weeknight dinners that take less than 30 minutes", "Sheet-pan chicken, one-pot pasta and a quick curry."),
    ("foodanddrink", "Why this grocery chain is cutting prices on 400 items", "The move follows a drop in wholesale costs for dairy and grain."),
    ("travel", "Ten winter getaways you can reach by train", "Mountain towns, hot springs and a snowy lakeside lodge."),
    ("travel", "Airlines add holiday flights as bookings hit a record", "Extra routes to Florida and the Caribbean start next month."),
    ("finance", "How to lower your credit card interest rate with one phone call", "Card issuers often agree when you ask and have a good record."),
    ("finance", "Mortgage rates fall for the third straight week", "The 30-year fixed average dipped below seven percent."),
    ("autos", "The most reliable used SUVs under $20,000", "Consumer surveys point to three compact models that age well."),
    ("autos", "Electric pickup sales double as prices come down", "Tax credits and new trims made the trucks easier to afford."),
    ("health", "A 10-minute morning stretch routine for stiff backs", "Physical therapists recommend five moves to start the day."),
    ("health", "What doctors say about taking vitamin D in winter", "Shorter days mean less sunlight; here is who should supplement."),
    ("lifestyle", "Holiday gift guide: 40 ideas for the football fan in your life", "Jerseys, tailgate gear and a heated stadium seat."),
    ("lifestyle", "How to keep houseplants alive when the heating comes on", "Humidity trays, less water and more light near the window."),
    ("tv", "The best new shows to stream this weekend", "A crime drama, a cooking contest and a space comedy premiere."),
    ("music", "Stadium tour dates announced for next summer", "Tickets go on sale Friday with a presale for fan club members."),
    ("news", "City council approves new bike lanes downtown", "Construction begins in spring along three busy avenues."),
    ("weather", "First big snowstorm of the season heads for the Midwest", "Up to ten inches expected from Chicago to Detroit by Sunday."),
    ("video", "Watch: backyard hockey rink built in one afternoon", "A family turned their lawn into a rink with boards and a liner."),
    ("kids", "Science kits that keep kids busy on snow days", "Crystal growing, circuits and a volcano that actually erupts."),
    ("movies", "Box office: animated sequel tops the holiday weekend", "The film earned more than expected across five days."),
]


def make_ads() -> list[Ad]:
    return [
        Ad(ad_id=f"N{10000 + 37 * i}", title=title, text=text, category=cat)
        for i, (cat, title, text) in enumerate(_ROWS)
    ]


def make_candidates(ads: list[Ad]) -> list[Candidate]:
    return [
        Candidate(ad=ad, priors={"dense": 1.0 - i / 100}, prior_score=1.0 - i / 100, prior_rank=i)
        for i, ad in enumerate(ads)
    ]


@pytest.fixture
def ads() -> list[Ad]:
    return make_ads()


@pytest.fixture
def history_ads(ads: list[Ad]) -> list[Ad]:
    return [ads[0], ads[4], ads[20]]


@pytest.fixture
def candidates(ads: list[Ad]) -> list[Candidate]:
    return make_candidates(ads[1:21])  # 20 candidates, none from the history
