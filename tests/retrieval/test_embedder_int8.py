"""The onnx-int8 backend: static activation scales, so an ad's vector does not depend on the ads batched
with it (ORT's dynamic quantisation scaled each batch as a whole: 3e-2 apart); the export is cached under
the model hash and named by the quantisation hash, which the embedder key carries."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from retrieval.embedder import CALIBRATION_ADS, Embedder, embedder_key, quantisation_hash
from retrieval.records import read_ads

# Measured 6.7e-8 (float rounding in the fp32 ops around the int8 MatMuls, which differ with the padding);
# the dynamic quantisation gave 3.2e-2 on the same texts.
BATCH_INDEPENDENCE_ATOL = 1e-6


@pytest.fixture(scope="module")
def int8(tmp_path_factory: pytest.TempPathFactory) -> Embedder:
    return Embedder(backend="onnx-int8", onnx_dir=tmp_path_factory.mktemp("onnx_exports"))


def test_an_ads_int8_vector_is_the_same_alone_and_in_any_batch(int8: Embedder):
    docs = [a.document() for a in read_ads(CALIBRATION_ADS)[::5]] + ["a", "word " * 300, "Shooter " * 40]
    alone = np.vstack([int8._onnx.encode([d], batch_size=1) for d in docs])
    one_batch = int8._onnx.encode(docs, batch_size=len(docs))  # every row padded to the longest
    budgeted = int8._onnx.encode(docs[::-1], batch_size=128, batch_tokens=48)[::-1]  # other companions, other widths
    assert np.abs(one_batch - alone).max() < BATCH_INDEPENDENCE_ATOL
    assert np.abs(budgeted - alone).max() < BATCH_INDEPENDENCE_ATOL


def test_the_int8_export_is_cached_and_named_by_its_quantisation(int8: Embedder, tmp_path_factory: pytest.TempPathFactory):
    export = int8.onnx_file
    assert export.parent.name == int8.key.split(":")[1] and quantisation_hash()[:12] in export.name
    assert int8.key == embedder_key(None, "onnx-int8") != embedder_key(None, "onnx")
    assert int8.key.endswith(quantisation_hash()[:12])  # a catalog of another quantisation is re-embedded
    before = export.stat().st_mtime_ns
    again = Embedder(backend="onnx-int8", onnx_dir=export.parents[1])
    assert again.onnx_file == export and export.stat().st_mtime_ns == before
    assert not list(export.parent.glob("*.dynamic.onnx"))  # the intermediate graph is not left behind


def test_int8_ranks_demo_ads_like_fp32(int8: Embedder, tmp_path_factory: pytest.TempPathFactory):
    docs = [a.document() for a in read_ads(CALIBRATION_ADS)[:60]]
    fp32 = Embedder(backend="onnx", onnx_dir=int8.onnx_file.parents[1]).encode(docs)
    got = int8.encode(docs)
    assert 1.0 - (got * fp32).sum(axis=1).min() < 5e-2  # int8 weights and activations: measured 2e-2 on Games
    top = lambda v: np.argsort(-(v @ v.T), axis=1)[:, 1:4]  # noqa: E731
    assert np.mean([len(set(a) & set(b)) / 3 for a, b in zip(top(got), top(fp32))]) > 0.7
