"""Importers from public logged-data formats into the canonical ads.jsonl / impressions.jsonl.

MIND (Microsoft News Recommendation Dataset), tab-separated, fields never quoted:
- news.tsv: news_id, category, subcategory, title, abstract, url, title_entities, abstract_entities
  (an optional header line starting with "news_id" is skipped);
- behaviors.tsv: impression_id, user_id, time ("11/15/2019 8:55:22 AM"), history (space-separated
  news ids, may be empty), impressions ("N123-1 N456-0", 1 = clicked, in display order).

Every line is checked; the first malformed one raises DataFileError naming file and line, and no
output file is left behind. Outputs are written to temporary files and renamed when complete.
Histories are kept as logged (MIND histories may repeat an id, and a candidate may also appear in
the user's history).
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from pydantic import ValidationError

from kernel.errors import DataFileError
from retrieval.records import AdRecord, ImpressionRecord

__all__ = ["MIND_TIME_FORMAT", "import_mind"]

MIND_TIME_FORMAT = "%m/%d/%Y %I:%M:%S %p"
_NEWS_FIELDS = 8
_BEHAVIOR_FIELDS = 5
_TOKEN = re.compile(r"(?P<id>\S+)-(?P<label>[01])")


def _tsv_lines(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) for each non-blank line; splits on "\\n" only, so a stray "\\r" stays in its field."""
    if not path.is_file():
        raise DataFileError(str(path), None, "file not found")
    with path.open("r", encoding="utf-8", newline="\n") as fh:
        for lineno, line in enumerate(fh, start=1):
            line = line.rstrip("\r\n")
            if line.strip():
                yield lineno, line.split("\t")


def _validation_reason(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"]) or "record"
    return f"field {loc!r}: {err['msg']}"


def _news_record(fields: list[str]) -> dict[str, Any]:
    news_id, category, subcategory, title, abstract = (f.strip() for f in fields[:5])
    rec: dict[str, Any] = {"ad_id": news_id, "title": title}
    for key, value in (("text", abstract), ("category", category), ("subcategory", subcategory)):
        if value:
            rec[key] = value
    return rec


def _behavior_record(fields: list[str]) -> dict[str, Any]:
    """The canonical impression for one behaviors.tsv row; ValueError says what is wrong."""
    impression_id, user_id, time, history, shown = (f.strip() for f in fields)
    try:
        timestamp = datetime.strptime(time, MIND_TIME_FORMAT).isoformat()
    except ValueError:
        raise ValueError(f"time {time!r} is not like '11/15/2019 8:55:22 AM'") from None
    candidates: list[str] = []
    clicked: list[str] = []
    for token in shown.split():
        match = _TOKEN.fullmatch(token)
        if match is None:
            raise ValueError(f"impression token {token!r} is not '<news id>-<0|1>' (MIND test files carry no labels)")
        candidates.append(match["id"])
        if match["label"] == "1":
            clicked.append(match["id"])
    if not candidates:
        raise ValueError("no candidates in the impressions column")
    if len(set(candidates)) != len(candidates):
        raise ValueError("a candidate is listed twice")
    return {
        "impression_id": impression_id,
        "user_id": user_id,
        "timestamp": timestamp,
        "history": history.split(),
        "candidates": candidates,
        "clicked": clicked,
    }


@contextmanager
def _atomic_jsonl(path: Path) -> Iterator[IO[str]]:
    """A temporary file next to `path`, renamed onto it only if the block completes."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the outputs are ordinary data files
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            yield fh
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_news(news_tsv: Path, out: IO[str]) -> int:
    seen: dict[str, int] = {}
    for lineno, fields in _tsv_lines(news_tsv):
        if not seen and fields[0].strip() == "news_id":
            continue  # header line
        if len(fields) != _NEWS_FIELDS:
            raise DataFileError(str(news_tsv), lineno, f"expected {_NEWS_FIELDS} tab-separated fields, got {len(fields)}")
        try:
            rec = AdRecord.model_validate(_news_record(fields))
        except ValidationError as e:
            raise DataFileError(str(news_tsv), lineno, _validation_reason(e)) from None
        if rec.ad_id in seen:
            raise DataFileError(str(news_tsv), lineno, f"duplicate news id {rec.ad_id!r} (first on line {seen[rec.ad_id]})")
        seen[rec.ad_id] = lineno
        out.write(json.dumps(rec.model_dump(exclude_none=True), ensure_ascii=False) + "\n")
    if not seen:
        raise DataFileError(str(news_tsv), None, "no news rows in file")
    return len(seen)


def _write_behaviors(behaviors_tsv: Path, out: IO[str], *, max_impressions: int | None) -> int:
    seen: dict[str, int] = {}
    for lineno, fields in _tsv_lines(behaviors_tsv):
        if max_impressions is not None and len(seen) >= max_impressions:
            break
        if len(fields) != _BEHAVIOR_FIELDS:
            raise DataFileError(
                str(behaviors_tsv), lineno, f"expected {_BEHAVIOR_FIELDS} tab-separated fields, got {len(fields)}"
            )
        try:
            rec = ImpressionRecord.model_validate(_behavior_record(fields))
        except ValidationError as e:
            raise DataFileError(str(behaviors_tsv), lineno, _validation_reason(e)) from None
        except ValueError as e:
            raise DataFileError(str(behaviors_tsv), lineno, str(e)) from None
        if rec.impression_id in seen:
            raise DataFileError(
                str(behaviors_tsv),
                lineno,
                f"duplicate impression id {rec.impression_id!r} (first on line {seen[rec.impression_id]})",
            )
        seen[rec.impression_id] = lineno
        out.write(json.dumps(rec.model_dump(), ensure_ascii=False) + "\n")
    if not seen:
        raise DataFileError(str(behaviors_tsv), None, "no impressions in file")
    return len(seen)


def import_mind(
    behaviors_tsv: Path | str,
    news_tsv: Path | str,
    *,
    out_dir: Path | str,
    max_impressions: int | None = None,
) -> tuple[int, int]:
    """Write out_dir/ads.jsonl (one ad per news row) and out_dir/impressions.jsonl; return (n_ads, n_impressions).

    An ad is a news row: ad_id = news id, title, text = abstract (omitted when empty), category,
    subcategory. `max_impressions` keeps only the first rows of behaviors.tsv. Impressions may name
    news ids that news.tsv lacks (sampled MIND subsets do); they are written as logged.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if max_impressions is not None and max_impressions < 1:
        raise ValueError(f"max_impressions must be >= 1, got {max_impressions}")
    # Both files are complete before either replaces an earlier import.
    with _atomic_jsonl(out / "ads.jsonl") as ads_fh, _atomic_jsonl(out / "impressions.jsonl") as imp_fh:
        n_ads = _write_news(Path(news_tsv), ads_fh)
        n_impressions = _write_behaviors(Path(behaviors_tsv), imp_fh, max_impressions=max_impressions)
    return n_ads, n_impressions
