"""The same ingest and query path against a real `chroma run` server process over HTTP (Settings.chroma_url)."""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from selection.services import build_services, make_store
from kernel.settings import Settings
from kernel.types import SelectRequest
from agent.local_server import free_port
from retrieval.ingest import ingest_catalog

from .test_ingest import CATALOG


@pytest.fixture(scope="module")
def chroma_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`chroma run` on a free loopback port with its own persistence dir, stopped at module teardown."""
    binary = shutil.which("chroma")
    if binary is None:
        pytest.fail("the `chroma` CLI is missing from the environment (it ships with the chromadb package)")
    port = free_port()
    workdir = tmp_path_factory.mktemp("chroma_server")
    log_path = workdir / "chroma.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [binary, "run", "--path", str(workdir / "db"), "--host", "127.0.0.1", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/api/v2/heartbeat", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chroma run did not come up on {url}:\n{log_path.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_ingest_and_query_through_a_chroma_server(tmp_path: Path, chroma_url: str, embedder):
    settings = Settings(_env_file=None, data_dir=tmp_path / "var", chroma_url=chroma_url)
    ads_path = tmp_path / "ads.jsonl"
    ads_path.write_text("".join(json.dumps(r) + "\n" for r in CATALOG))

    store = make_store(settings)
    rep = ingest_catalog(ads_path=ads_path, store=store, embedder=embedder)
    assert not rep.skipped_unchanged

    # A second client (another process would see the same) finds the catalog and its hash on the server.
    again = make_store(settings)
    assert again.count() == len(CATALOG) and again.stored_hash() == rep.content_hash
    assert ingest_catalog(ads_path=ads_path, store=again, embedder=embedder).skipped_unchanged
    assert not (tmp_path / "var" / "chroma").exists()  # nothing was written to the embedded store

    index = again.load_index()
    query = embedder.encode(["lightweight shoes for a road marathon"])[0]
    hits = again.nearest(query, 3)
    assert hits[0][0] in {"run-1", "run-2"}
    assert [h[0] for h in hits] == sorted((h[0] for h in hits), key=lambda i: -float(index.vectors[index.row[i]] @ query))

    services = build_services(settings, embedder=embedder)
    d = asyncio.run(services.selector.aselect(SelectRequest(user_id="u", history=["run-2"], k=2, use_llm=False)))
    assert d.ads[0].ad.ad_id == "run-1"
    assert not d.degraded and np.isfinite([a.score for a in d.ads]).all()
