"""Canonical JSONL records (ads and logged impressions): validation with file and line in every error."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kernel.errors import DataFileError
from kernel.types import Ad

MAX_TITLE = 1000
MAX_TEXT = 10000
MAX_ID = 128


class AdRecord(BaseModel):
    """One catalog line. Known fields are typed; any other field is kept as metadata."""

    model_config = ConfigDict(extra="allow", str_strip_whitespace=True)

    ad_id: str = Field(min_length=1, max_length=MAX_ID)
    title: str = Field(min_length=1, max_length=MAX_TITLE)
    text: str | None = Field(None, max_length=MAX_TEXT)
    abstract: str | None = Field(None, max_length=MAX_TEXT)
    category: str | None = Field(None, max_length=200)
    subcategory: str | None = Field(None, max_length=200)
    advertiser: str | None = Field(None, max_length=200)
    bid: float | None = Field(None, ge=0, le=1e6)
    landing_url: str | None = Field(None, max_length=2000)

    @field_validator("ad_id", mode="before")
    @classmethod
    def _id_str(cls, v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise ValueError("ad_id must be a string")
        return str(v)

    def to_ad(self) -> Ad:
        extra = {k: v for k, v in (self.model_extra or {}).items()}
        return Ad(
            ad_id=self.ad_id,
            title=self.title,
            text=self.text or self.abstract or "",
            category=self.category or "",
            subcategory=self.subcategory or "",
            advertiser=self.advertiser or "",
            bid=1.0 if self.bid is None else float(self.bid),
            landing_url=self.landing_url or "",
            metadata=extra,
        )


class ImpressionRecord(BaseModel):
    model_config = ConfigDict(extra="allow")

    impression_id: str = Field(min_length=1, max_length=MAX_ID)
    user_id: str = Field(min_length=1, max_length=MAX_ID)
    timestamp: str | None = None
    history: list[str] = Field(default_factory=list)
    candidates: list[str] = Field(default_factory=list)
    clicked: list[str] = Field(default_factory=list)

    @field_validator("impression_id", "user_id", mode="before")
    @classmethod
    def _id_str(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v


def _json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    path = Path(path)
    if not path.exists():
        raise DataFileError(str(path), None, "file not found")
    with path.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFileError(str(path), lineno, f"malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataFileError(str(path), lineno, "each line must be a JSON object")
            yield lineno, obj


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"]) or "record"
    return f"field {loc!r}: {err['msg']}"


def read_ads(path: Path) -> list[Ad]:
    """Read and validate a whole catalog file before anything is written anywhere."""
    ads: list[Ad] = []
    seen: dict[str, int] = {}
    for lineno, obj in _json_lines(path):
        try:
            rec = AdRecord.model_validate(obj)
        except ValidationError as e:
            raise DataFileError(str(path), lineno, _first_error(e)) from None
        if rec.ad_id in seen:
            raise DataFileError(str(path), lineno, f"duplicate ad_id {rec.ad_id!r} (first on line {seen[rec.ad_id]})")
        seen[rec.ad_id] = lineno
        ads.append(rec.to_ad())
    if not ads:
        raise DataFileError(str(path), None, "no ads in file")
    return ads


def iter_impressions(path: Path) -> Iterator[tuple[int, ImpressionRecord]]:
    for lineno, obj in _json_lines(path):
        try:
            yield lineno, ImpressionRecord.model_validate(obj)
        except ValidationError as e:
            raise DataFileError(str(path), lineno, _first_error(e)) from None


def iter_histories(path: Path) -> Iterator[list[str]]:
    """Only the histories of logged impressions: behavioural priors never learn from `clicked`."""
    for _, rec in iter_impressions(path):
        yield rec.history


def read_histories(path: Path) -> list[list[str]]:
    return list(iter_histories(path))
