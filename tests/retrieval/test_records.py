"""Canonical JSONL records: every bad line is a DataFileError naming the file and the line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kernel.errors import DataFileError
from retrieval.records import MAX_ID, MAX_TEXT, MAX_TITLE, read_ads, read_histories

GOOD = [
    {"ad_id": "a1", "title": "Trail shoe", "text": "Grippy outsole.", "category": "running shoes", "bid": 0.5},
    {"ad_id": "a2", "title": "Road shoe", "advertiser": "Stridewell"},
]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def ads_file(tmp_path: Path, bad_line: str) -> Path:
    """Two good ads, a blank line, then the bad one: the bad line is line 4 of the file."""
    return write_lines(tmp_path / "ads.jsonl", [json.dumps(GOOD[0]), json.dumps(GOOD[1]), "", bad_line])


BAD_AD_LINES = {
    "malformed_json": '{"ad_id": "a3", "title": "Broken"',
    "not_an_object": '["a3", "Broken"]',
    "missing_id": json.dumps({"title": "No id"}),
    "missing_title": json.dumps({"ad_id": "a3"}),
    "empty_title": json.dumps({"ad_id": "a3", "title": "   "}),
    "duplicate_id": json.dumps({"ad_id": "a1", "title": "Same id again"}),
    "oversize_id": json.dumps({"ad_id": "x" * (MAX_ID + 1), "title": "Long id"}),
    "oversize_title": json.dumps({"ad_id": "a3", "title": "t" * (MAX_TITLE + 1)}),
    "oversize_text": json.dumps({"ad_id": "a3", "title": "Long text", "text": "w" * (MAX_TEXT + 1)}),
    "bid_not_a_number": json.dumps({"ad_id": "a3", "title": "Cheap", "bid": "cheap"}),
    "negative_bid": json.dumps({"ad_id": "a3", "title": "Negative", "bid": -1}),
    "title_not_a_string": json.dumps({"ad_id": "a3", "title": 123}),
    "category_is_a_list": json.dumps({"ad_id": "a3", "title": "Listy", "category": ["a", "b"]}),
    "id_is_a_bool": json.dumps({"ad_id": True, "title": "Boolean id"}),
}


@pytest.mark.parametrize("case", sorted(BAD_AD_LINES))
def test_bad_ad_line_names_file_and_line(tmp_path: Path, case: str):
    path = ads_file(tmp_path, BAD_AD_LINES[case])
    with pytest.raises(DataFileError) as info:
        read_ads(path)
    err = info.value
    assert (err.path, err.line) == (str(path), 4)
    assert str(err).startswith(f"{path}:4: ")


def test_error_says_what_is_wrong(tmp_path: Path):
    with pytest.raises(DataFileError, match=r"duplicate ad_id 'a1' \(first on line 1\)"):
        read_ads(ads_file(tmp_path, BAD_AD_LINES["duplicate_id"]))
    with pytest.raises(DataFileError, match=r"field 'title'"):
        read_ads(ads_file(tmp_path, BAD_AD_LINES["missing_title"]))
    with pytest.raises(DataFileError, match=r"malformed JSON"):
        read_ads(ads_file(tmp_path, BAD_AD_LINES["malformed_json"]))


def test_good_file_reads_typed_ads_with_extra_fields_as_metadata(tmp_path: Path):
    extra = {"ad_id": 7, "title": "  Numeric id  ", "brand_safety": "high"}
    path = write_lines(tmp_path / "ads.jsonl", [json.dumps(GOOD[0]), json.dumps(GOOD[1]), json.dumps(extra)])
    ads = read_ads(path)
    assert [a.ad_id for a in ads] == ["a1", "a2", "7"]
    assert ads[0].bid == 0.5 and ads[0].category == "running shoes"
    assert ads[1].bid == 1.0  # default bid when absent
    assert ads[2].title == "Numeric id" and ads[2].metadata == {"brand_safety": "high"}


def test_missing_and_empty_files_are_data_file_errors(tmp_path: Path):
    with pytest.raises(DataFileError) as info:
        read_ads(tmp_path / "nope.jsonl")
    assert info.value.line is None and "nope.jsonl" in str(info.value)
    with pytest.raises(DataFileError, match="no ads"):
        read_ads(write_lines(tmp_path / "blank.jsonl", ["", "  "]))


@pytest.mark.parametrize(
    "bad_line",
    [
        '{"impression_id": "i3", "user_id": "u3", "history": ["a1"',  # malformed JSON
        json.dumps({"user_id": "u3", "history": []}),  # missing impression_id
        json.dumps({"impression_id": "i3", "user_id": "u3", "history": "a1,a2"}),  # history not a list
        json.dumps({"impression_id": "i3", "user_id": "u3", "clicked": [{"id": "a1"}]}),  # wrong item type
    ],
)
def test_bad_impression_line_names_file_and_line(tmp_path: Path, bad_line: str):
    good = [json.dumps({"impression_id": f"i{i}", "user_id": "u", "history": ["a1"]}) for i in (1, 2)]
    path = write_lines(tmp_path / "imps.jsonl", [*good, bad_line])
    with pytest.raises(DataFileError) as info:
        read_histories(path)
    assert (info.value.path, info.value.line) == (str(path), 3)
