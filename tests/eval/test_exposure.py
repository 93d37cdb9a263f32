"""Exposure: Gini against hand-computed cases, shares and coverage over a small catalog."""
from __future__ import annotations

import pytest

from eval.exposure import exposure, gini


def test_gini_hand_computed():
    assert gini([1, 1, 1, 1]) == pytest.approx(0.0)
    assert gini([0, 0, 0, 4]) == pytest.approx(0.75)  # (n-1)/n: everything to one of four
    assert gini([1, 2, 3]) == pytest.approx(2 / 9)  # Σ|xi-xj| / (2 n² mean) = 8 / (2·9·2)
    assert gini([]) == 0.0 and gini([0, 0]) == 0.0


def test_exposure_counts_unserved_groups_and_coverage():
    catalog = {
        "a1": {"advertiser": "A", "category": "x"},
        "a2": {"advertiser": "A", "category": "y"},
        "b1": {"advertiser": "B", "category": "x"},
        "c1": {"advertiser": "C", "category": "z"},
    }
    e = exposure([["a1"], ["a2"], ["a1"], ["b1"], ["unknown"]], catalog)
    assert e["impressions"] == 4 and e["coverage"] == 3 / 4
    assert e["by_advertiser"]["top_shares"] == {"A": 0.75, "B": 0.25, "C": 0.0}
    assert e["by_advertiser"]["gini"] == pytest.approx(gini([3, 1, 0]))
    assert e["by_category"]["groups"] == 3 and e["by_category"]["top_shares"]["x"] == 0.75
