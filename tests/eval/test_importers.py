from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kernel.errors import DataFileError
from eval.importers import import_mind
from retrieval.records import iter_impressions, read_ads

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
MIND_SAMPLE = SHARED_DATA / "mind_small_sample"

NEWS_HEADER = "news_id\tcategory\tsubcategory\ttitle\tabstract\turl\ttitle_entities\tabstract_entities"
NEWS_ROWS = [
    "N1\tsports\tfootball_nfl\tBig win for the home team\tA late field goal sealed it.\thttps://x/1\t[]\t[]",
    "N2\tfinance\tmarkets\tStocks rally on Friday\t\thttps://x/2\t[]\t[]",  # empty abstract
    "N3\tfoodanddrink\trecipes\tFive-minute pasta \u2014 \u00e9pices\tQuick and cheap.\thttps://x/3\t[]\t[]",
]
BEHAVIOR_ROWS = [
    "1\tU1\t11/15/2019 8:55:22 AM\tN1 N2\tN3-1 N2-0 N9-0",
    "2\tU2\t11/9/2019 12:01:13 AM\t\tN1-0 N2-1 N3-1",  # empty history, midnight, two clicks
    "3\tU1\t11/15/2019 12:30:00 PM\tN1 N2 N1\tN9-0 N8-0",  # repeated history id, no click
]


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture
def mind(tmp_path: Path) -> tuple[Path, Path]:
    return _write(tmp_path / "behaviors.tsv", BEHAVIOR_ROWS), _write(tmp_path / "news.tsv", [NEWS_HEADER, *NEWS_ROWS])


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_import_writes_canonical_files(mind, tmp_path):
    behaviors, news = mind
    out = tmp_path / "out" / "mind"
    assert import_mind(behaviors, news, out_dir=out) == (3, 3)

    ads = _jsonl(out / "ads.jsonl")
    assert ads[0] == {
        "ad_id": "N1",
        "title": "Big win for the home team",
        "text": "A late field goal sealed it.",
        "category": "sports",
        "subcategory": "football_nfl",
    }
    assert "text" not in ads[1]
    assert ads[2]["title"] == "Five-minute pasta \u2014 \u00e9pices"

    imps = _jsonl(out / "impressions.jsonl")
    assert imps[0] == {
        "impression_id": "1",
        "user_id": "U1",
        "timestamp": "2019-11-15T08:55:22",
        "history": ["N1", "N2"],
        "candidates": ["N3", "N2", "N9"],
        "clicked": ["N3"],
    }
    assert imps[1]["timestamp"] == "2019-11-09T00:01:13"  # 12 AM is midnight
    assert imps[1]["history"] == [] and imps[1]["clicked"] == ["N2", "N3"]
    assert imps[2]["timestamp"] == "2019-11-15T12:30:00"  # 12 PM is noon
    assert imps[2]["history"] == ["N1", "N2", "N1"]  # kept as logged
    assert imps[2]["clicked"] == []


def test_outputs_read_back_with_the_canonical_readers(mind, tmp_path):
    import_mind(*mind, out_dir=tmp_path)
    assert [a.ad_id for a in read_ads(tmp_path / "ads.jsonl")] == ["N1", "N2", "N3"]
    assert [r.impression_id for _, r in iter_impressions(tmp_path / "impressions.jsonl")] == ["1", "2", "3"]


def test_news_without_header_and_crlf_line_ends(tmp_path):
    behaviors = _write(tmp_path / "b.tsv", BEHAVIOR_ROWS)
    news = tmp_path / "n.tsv"
    news.write_bytes("".join(row + "\r\n" for row in NEWS_ROWS).encode("utf-8"))
    assert import_mind(behaviors, news, out_dir=tmp_path / "out") == (3, 3)
    assert _jsonl(tmp_path / "out" / "ads.jsonl")[2] == {
        "ad_id": "N3",
        "title": "Five-minute pasta \u2014 \u00e9pices",
        "text": "Quick and cheap.",
        "category": "foodanddrink",
        "subcategory": "recipes",
    }


def test_max_impressions(mind, tmp_path):
    assert import_mind(*mind, out_dir=tmp_path, max_impressions=2) == (3, 2)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("4\tU3\t11/15/2019 8:55:22 AM\tN1", "expected 5 tab-separated fields, got 4"),
        ("4\tU3\t2019-11-15 08:55:22\tN1\tN1-1", "time '2019-11-15 08:55:22'"),
        ("4\tU3\t11/15/2019 8:55:22 AM\tN1\tN1-2 N2-0", "token 'N1-2'"),
        ("4\tU3\t11/15/2019 8:55:22 AM\tN1\tN1 N2", "no labels"),
        ("4\tU3\t11/15/2019 8:55:22 AM\tN1\t", "no candidates"),
        ("4\tU3\t11/15/2019 8:55:22 AM\tN1\tN1-0 N1-1", "listed twice"),
        ("4\t\t11/15/2019 8:55:22 AM\tN1\tN1-1", "field 'user_id'"),
        ("1\tU3\t11/15/2019 8:55:22 AM\tN1\tN1-1", "duplicate impression id '1' (first on line 1)"),
    ],
)
def test_malformed_behaviors_line_names_file_and_line(tmp_path, line, reason):
    behaviors = _write(tmp_path / "behaviors.tsv", [*BEHAVIOR_ROWS[:2], "", line])  # blank line 3 is skipped
    news = _write(tmp_path / "news.tsv", NEWS_ROWS)
    with pytest.raises(DataFileError) as exc:
        import_mind(behaviors, news, out_dir=tmp_path / "out")
    assert exc.value.path == str(behaviors) and exc.value.line == 4
    assert reason in exc.value.reason
    assert "behaviors.tsv:4: " in str(exc.value)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("N4\tnews\tus\tTitle only", "expected 8 tab-separated fields, got 4"),
        ("N4\tnews\tus\t\tabstract\tu\t[]\t[]", "field 'title'"),
        ("N1\tnews\tus\tAgain\tabstract\tu\t[]\t[]", "duplicate news id 'N1' (first on line 2)"),
        ("N4\tnews\tus\tA\tB\tu\t[]\t[]\textra", "got 9"),
    ],
)
def test_malformed_news_line_names_file_and_line(tmp_path, line, reason):
    behaviors = _write(tmp_path / "behaviors.tsv", BEHAVIOR_ROWS)
    news = _write(tmp_path / "news.tsv", [NEWS_HEADER, *NEWS_ROWS, line])
    with pytest.raises(DataFileError) as exc:
        import_mind(behaviors, news, out_dir=tmp_path / "out")
    assert exc.value.path == str(news) and exc.value.line == 5
    assert reason in exc.value.reason


def test_failed_import_leaves_no_files_and_keeps_a_previous_import(mind, tmp_path):
    out = tmp_path / "out"
    import_mind(*mind, out_dir=out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = _write(tmp_path / "bad.tsv", ["1\tU1\tnot a time\t\tN1-1"])
    with pytest.raises(DataFileError):
        import_mind(bad, mind[1], out_dir=out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(DataFileError):
        import_mind(bad, mind[1], out_dir=tmp_path / "fresh")
    assert list((tmp_path / "fresh").iterdir()) == []


def test_missing_and_empty_files(tmp_path, mind):
    with pytest.raises(DataFileError, match="file not found"):
        import_mind(tmp_path / "nope.tsv", mind[1], out_dir=tmp_path / "o")
    empty = _write(tmp_path / "empty.tsv", [NEWS_HEADER])
    with pytest.raises(DataFileError, match="no news rows"):
        import_mind(mind[0], empty, out_dir=tmp_path / "o")


def test_output_files_are_world_readable(mind, tmp_path):
    import_mind(*mind, out_dir=tmp_path)
    assert os.stat(tmp_path / "ads.jsonl").st_mode & 0o044 == 0o044


@pytest.mark.skipif(not MIND_SAMPLE.is_dir(), reason="shared MIND sample not present")
def test_real_mind_sample_first_50_impressions(tmp_path):
    n_ads, n_imps = import_mind(
        MIND_SAMPLE / "behaviors_dev.tsv", MIND_SAMPLE / "news.tsv", out_dir=tmp_path, max_impressions=50
    )
    assert n_imps == 50 and n_ads > 1000
    got = [r for _, r in iter_impressions(tmp_path / "impressions.jsonl")]
    # The folder's own parse of the same rows (prepare.py) agrees field by field.
    with (MIND_SAMPLE / "behaviors_dev.jsonl").open(encoding="utf-8") as fh:
        reference = [json.loads(next(fh)) for _ in range(50)]
    for rec, ref in zip(got, reference, strict=True):
        assert rec.impression_id == str(ref["impression_id"]) and rec.user_id == ref["user_id"]
        assert rec.timestamp == ref["time"]
        assert rec.history == ref["history"] and rec.candidates == ref["candidates"]
        assert rec.clicked == [c for c, label in zip(ref["candidates"], ref["labels"]) if label == 1]
        assert rec.clicked  # every MIND training impression has a click
    ads = read_ads(tmp_path / "ads.jsonl")
    assert len(ads) == n_ads and all(a.title for a in ads)
