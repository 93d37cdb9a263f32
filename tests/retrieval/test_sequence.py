"""Sequence model: it learns an order from histories, serves in numpy what torch trained, persists and is reused."""
from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from kernel.errors import CatalogError, SequenceModelMismatch
from retrieval.sequence import SequenceConfig, SequenceModel, train_or_load
from retrieval.sequence_train import SASRec, train_sequence_model

N = 24
IDS = [f"i{k}" for k in range(N)]
SMALL = SequenceConfig(hidden=16, max_len=8, heads=2, dropout=0.0, lr=5e-3, max_epochs=12, patience=12, holdout_frac=0.1)


def cyclic_histories(n: int, *, seed: int) -> list[list[str]]:
    """Runs of consecutive items (k, k+1, k+2, … mod N): the next item is always the successor."""
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        start, length = rnd.randrange(N), rnd.randint(3, 8)
        out.append([IDS[(start + j) % N] for j in range(length)])
    return out


@pytest.fixture(scope="module")
def trained() -> SequenceModel:
    return train_sequence_model(cyclic_histories(400, seed=0), IDS, config=SMALL, show_progress=False, threads=1)


def test_loss_falls_and_the_true_next_item_ranks_first_more_often_than_chance(trained: SequenceModel):
    curve = trained.meta["train"]["curve"]
    assert curve[-1]["loss"] < 0.5 * curve[0]["loss"]
    tests = cyclic_histories(200, seed=1)  # unseen draws of the pattern
    hits = sum(int(trained.top_n([IDS.index(a) for a in h[:-1]], 1)[0]) == IDS.index(h[-1]) for h in tests)
    assert hits / len(tests) > 10 / N  # chance is 1/N


def test_the_sampled_softmax_loss_also_learns_the_order():
    """The default loss is the full softmax ("ce"); the cheaper sampled-negatives loss stays a working option."""
    cfg = replace(SMALL, loss="sampled", negatives=8)
    assert SMALL.loss != cfg.loss
    m = train_sequence_model(cyclic_histories(400, seed=0), IDS, config=cfg, show_progress=False, threads=1)
    curve = m.meta["train"]["curve"]
    assert curve[-1]["loss"] < 0.5 * curve[0]["loss"]
    tests = cyclic_histories(200, seed=1)
    hits = sum(int(m.top_n([IDS.index(a) for a in h[:-1]], 1)[0]) == IDS.index(h[-1]) for h in tests)
    assert hits / len(tests) > 10 / N


def test_numpy_serving_matches_the_torch_forward_pass():
    cfg = SequenceConfig(hidden=16, max_len=8, heads=2, blocks=2)
    torch.manual_seed(3)
    net = SASRec(N, cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorm and bias values, so a transposed or skipped weight shows
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    served = SequenceModel(cfg, net.export_arrays(), "h", N)
    for hist in ([5], [1, 2, 3], list(range(8)), list(range(12))):
        with torch.no_grad():
            items = net.item_matrix()
            want = (net(torch.tensor([hist[-cfg.max_len :]]), items)[0, -1] @ items.T).numpy()
        np.testing.assert_allclose(served.scores(hist), want, rtol=1e-4, atol=1e-4)


def test_saved_model_reloads_and_scores_identically(trained: SequenceModel, tmp_path: Path):
    trained.save(tmp_path / "seq")
    back = SequenceModel.load(tmp_path / "seq", IDS)
    for hist in ([0], [3, 4, 5], [20, 21, 22, 23, 0, 1, 2, 3, 4, 5]):
        np.testing.assert_allclose(back.scores(hist), trained.scores(hist), rtol=0, atol=1e-6)
    assert back.config == trained.config


def test_a_changed_catalog_is_refused_on_load(trained: SequenceModel, tmp_path: Path):
    trained.save(tmp_path / "seq")
    assert SequenceModel.load(tmp_path / "nothing", IDS) is None
    with pytest.raises(SequenceModelMismatch) as e:
        SequenceModel.load(tmp_path / "seq", IDS[1:] + IDS[:1])  # same ads, other row order
    assert isinstance(e.value, CatalogError)
    with pytest.raises(SequenceModelMismatch):
        SequenceModel.load(tmp_path / "seq", IDS + ["new"])


def test_top_n_excludes_and_orders_by_score(trained: SequenceModel):
    hist = [IDS.index("i3"), IDS.index("i4")]
    s = trained.scores(hist)
    top = trained.top_n(hist, 5, exclude=[int(np.argmax(s))])
    assert int(np.argmax(s)) not in top.tolist() and len(top) == 5
    assert np.all(np.diff(s[top]) <= 0)
    assert len(trained.top_n([], 5)) == 0 and not trained.scores([]).any()


def test_train_or_load_reuses_unchanged_inputs_and_retrains_changed_ones(tmp_path: Path):
    cfg = SequenceConfig(hidden=8, max_len=8, dropout=0.0, max_epochs=2, patience=2)
    hist = cyclic_histories(60, seed=2)
    first = train_or_load(histories=hist, ids=IDS, directory=tmp_path / "seq", config=cfg, show_progress=False, threads=1)
    again = train_or_load(histories=hist, ids=IDS, directory=tmp_path / "seq", config=cfg, show_progress=False, threads=1)
    assert first.meta["reused"] is False and again.meta["reused"] is True
    np.testing.assert_array_equal(again.items, first.items)

    changed = train_or_load(histories=hist[:-1], ids=IDS, directory=tmp_path / "seq", config=cfg, show_progress=False, threads=1)
    assert changed.meta["reused"] is False
    other_cfg = SequenceConfig(hidden=8, max_len=8, dropout=0.0, max_epochs=2, patience=2, seed=1)
    assert train_or_load(histories=hist[:-1], ids=IDS, directory=tmp_path / "seq", config=other_cfg, threads=1).meta["reused"] is False
    ids2 = IDS + ["new"]
    moved = train_or_load(histories=hist[:-1], ids=ids2, directory=tmp_path / "seq", config=other_cfg, threads=1)
    assert moved.meta["reused"] is False and moved.n_items == N + 1
    assert SequenceModel.load(tmp_path / "seq", ids2) is not None


def test_text_vectors_seed_the_item_vectors_of_items_never_seen():
    """With text_init a never-seen item gets the projection of its title vector, so similar titles stay close."""
    rng = np.random.default_rng(0)
    text = rng.normal(size=(N, 12)).astype(np.float32)
    text[N - 1] = text[N - 2] + 0.01 * rng.normal(size=12)  # i23 (never in a history) reads like i22
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    hist = [h for h in cyclic_histories(200, seed=4) if "i23" not in h]
    cfg = SequenceConfig(hidden=16, max_len=8, dropout=0.0, max_epochs=3, patience=3, text_init=True)
    m = train_sequence_model(hist, IDS, config=cfg, text_vectors=text, show_progress=False, threads=1)
    e = m.items / np.linalg.norm(m.items, axis=1, keepdims=True)
    sims = e[: N - 1] @ e[N - 1]
    assert int(np.argmax(sims)) == N - 2
