"""The ONNX embedder backend: exported locally from the bundled MiniLM, reloaded from its cache, within a
small cosine of sentence-transformers on torch; a catalog embedded by one backend is refused by the other
until `ingest` re-embeds it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kernel.errors import EmbedderMismatch
from kernel.settings import Settings
from retrieval.embedder import Embedder, available_cpus, embedder_key, token_batches
from retrieval.ingest import ingest_catalog
from selection.services import build_services, make_store

DEMO_ADS = Path(__file__).resolve().parents[2] / "data" / "demo" / "ads.jsonl"
COSINE_TOLERANCE = 1e-4  # fp32 ONNX against torch: same weights, same graph, float reordering only


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx_exports")


@pytest.fixture(scope="module")
def torch_embedder() -> Embedder:
    return Embedder(backend="torch")


@pytest.fixture(scope="module")
def onnx_embedder(onnx_dir: Path) -> Embedder:
    return Embedder(backend="onnx", onnx_dir=onnx_dir)


def demo_documents(n: int) -> list[str]:
    from retrieval.records import read_ads

    return [a.document() for a in read_ads(DEMO_ADS)[:n]]


def test_onnx_export_is_cached_under_the_model_hash_and_reloaded(onnx_embedder: Embedder, onnx_dir: Path):
    export = onnx_embedder.onnx_file
    assert export.parent == onnx_dir / onnx_embedder.key.split(":", 1)[1]
    assert export.is_file()
    before = export.stat().st_mtime_ns
    again = Embedder(backend="onnx", onnx_dir=onnx_dir)  # offline (HF_HUB_OFFLINE): nothing but the local files
    assert again.onnx_file == export and export.stat().st_mtime_ns == before  # loaded, not exported again
    assert again.key == onnx_embedder.key == embedder_key(None, "onnx")


def test_onnx_vectors_match_torch_within_a_small_cosine(onnx_embedder: Embedder, torch_embedder: Embedder):
    docs = demo_documents(32)
    edges = ["", "a", "word " * 300]  # empty, one token, truncated at max_seq_length (a batch of its own: short padding above)
    ref = np.vstack([torch_embedder.encode(docs), torch_embedder.encode(edges)])
    got = np.vstack([onnx_embedder.encode(docs), onnx_embedder.encode(edges)])
    docs = docs + edges
    assert got.shape == ref.shape and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    cosine = (got * ref).sum(axis=1)
    assert 1.0 - cosine.min() < COSINE_TOLERANCE
    # Same neighbours: each demo document's nearest others are unchanged.
    n = len(docs) - len(edges)
    assert (np.argsort(-(got[:n] @ got[:n].T), axis=1)[:, :5] == np.argsort(-(ref[:n] @ ref[:n].T), axis=1)[:, :5]).all()


def test_a_catalog_embedded_by_torch_is_refused_by_onnx_until_reingested(
    tmp_path: Path, torch_embedder: Embedder, onnx_embedder: Embedder, onnx_dir: Path
):
    ads = tmp_path / "ads.jsonl"
    ads.write_text("".join(DEMO_ADS.read_text(encoding="utf-8").splitlines(keepends=True)[:40]), encoding="utf-8")
    settings = Settings(_env_file=None, data_dir=tmp_path / "var", llm_url=None, embed_backend="onnx", onnx_dir=onnx_dir)
    store = make_store(settings)
    first = ingest_catalog(ads_path=ads, store=store, embedder=torch_embedder)
    assert store.stored_embedder() == torch_embedder.key != onnx_embedder.key

    with pytest.raises(EmbedderMismatch) as err:
        build_services(settings, embedder=onnx_embedder, store=store, serving=False)
    assert (err.value.stored, err.value.configured) == (torch_embedder.key, onnx_embedder.key)

    again = ingest_catalog(ads_path=ads, store=store, embedder=onnx_embedder)  # same file, another embedder
    assert not again.skipped_unchanged and again.embedded == first.embedded == first.ads
    assert store.stored_embedder() == onnx_embedder.key
    build_services(settings, embedder=onnx_embedder, store=store, serving=False)  # one embedder now: accepted


def test_onnx_session_options_carry_the_configured_threads(onnx_dir: Path):
    import onnxruntime as ort

    from selection.services import make_embedder

    settings = Settings(_env_file=None, embed_backend="onnx", onnx_dir=onnx_dir, embed_threads=1, embed_spin=True)
    opts = make_embedder(settings)._onnx.session.get_session_options()
    assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (1, 1)
    assert opts.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    default = make_embedder(settings.model_copy(update={"embed_threads": 0, "embed_spin": False}))._onnx.session.get_session_options()
    assert default.intra_op_num_threads == available_cpus()  # 0: the cores this process may use
    assert default.get_session_config_entry("session.intra_op.allow_spinning") == "0"


@pytest.mark.parametrize("batch_tokens", [None, 1, 7, 64, 10_000])
def test_token_batches_hold_every_row_once_longest_first_within_the_budget(batch_tokens: int | None):
    lengths = [5, 1, 40, 12, 12, 3, 200, 0, 9, 9, 9, 30]
    batches = list(token_batches(lengths, batch_size=4, batch_tokens=batch_tokens))
    rows = [int(r) for b in batches for r in b]
    assert sorted(rows) == list(range(len(lengths)))
    assert [lengths[r] for r in rows] == sorted(lengths, reverse=True)
    for b in batches:
        assert 1 <= len(b) <= 4
        if batch_tokens is not None and len(b) > 1:
            assert len(b) * max(lengths[int(r)] for r in b) <= batch_tokens


def test_onnx_vectors_do_not_depend_on_the_batching(onnx_embedder: Embedder):
    docs = demo_documents(40) + ["word " * 300]
    one = onnx_embedder._onnx.encode(docs, batch_size=128, batch_tokens=None)  # one padded batch
    small = onnx_embedder._onnx.encode(docs, batch_size=128, batch_tokens=48)  # token-budget batches
    np.testing.assert_allclose(small, one, atol=1e-5)

