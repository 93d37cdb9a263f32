"""Logged impressions as a Ray Dataset, in file order: a JSONL or Parquet file, or a folder of parts.

JSONL is read as lines (Ray Data `read_text`) and each line is parsed and validated on the actors
exactly as retrieval.records parses a file (json.loads, then ImpressionRecord), so both readers see
the same records; Parquet rows (`read_parquet`) go through the same ImpressionRecord. Parts of a folder
are read in name order. The dataset is cut to the task's `limit` (the first N records, as the
single-process reader), split into `blocks` blocks for the actor pool; `preserve_order` keeps the rows of
every later stage in input order.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kernel.errors import DataFileError
from retrieval.records import ImpressionRecord

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
READ_CPUS = 0.1  # reading and splitting lines is light; the actors hold the cores


def impression_parts(path: Path) -> tuple[str, list[str]]:
    """("jsonl" | "parquet", the files in read order) for a file or a folder of part files."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in JSONL_SUFFIXES + PARQUET_SUFFIXES)
        if not files:
            raise DataFileError(str(path), None, "no .jsonl or .parquet part files in the folder")
    elif path.is_file():
        files = [path]
    else:
        raise DataFileError(str(path), None, "file not found")
    kinds = {"parquet" if p.suffix in PARQUET_SUFFIXES else "jsonl" for p in files}
    if len(kinds) > 1:
        raise DataFileError(str(path), None, "mixes JSONL and Parquet parts")
    return kinds.pop(), [str(p) for p in files]


def impressions_dataset(path: Path, *, limit: int | None, blocks: int):
    """(kind, dataset of raw rows) in file order: JSONL rows {"text": line}, Parquet rows the columns."""
    import ray.data

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    kind, files = impression_parts(path)
    small = {"num_cpus": READ_CPUS}
    if kind == "jsonl":
        ds = ray.data.read_text(files, override_num_blocks=blocks, ray_remote_args=small)
        ds = ds.filter(lambda row: bool(row["text"].strip()), num_cpus=READ_CPUS)  # blank lines are no records
    else:
        ds = ray.data.read_parquet(files, override_num_blocks=blocks, ray_remote_args=small)
    return kind, ds.limit(limit) if limit is not None else ds


def batch_records(batch, kind: str) -> list[ImpressionRecord]:
    """The validated records of one pyarrow batch (DataFileError on a bad record, as the file reader)."""
    return [parse_row(row, kind) for row in batch.to_pylist()]


def parse_row(row: dict[str, Any], kind: str) -> ImpressionRecord:
    from pydantic import ValidationError

    where = "impressions (ray)"
    if kind == "jsonl":
        try:
            obj = json.loads(row["text"])
        except json.JSONDecodeError as e:
            raise DataFileError(where, None, f"malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataFileError(where, None, "each line must be a JSON object")
    else:
        obj = {k: v for k, v in row.items() if v is not None}  # a column missing in a row: the field's default
    try:
        return ImpressionRecord.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        raise DataFileError(where, None, f"field {'.'.join(str(x) for x in err['loc']) or 'record'!r}: {err['msg']}") from None
