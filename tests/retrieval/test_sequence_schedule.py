"""Sequence model training options: the lr schedule (warmup + cosine decay), label smoothing, and the
config digest that keys saved models (options left at their pre-existing values keep the old key)."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest

from retrieval.sequence import SequenceConfig, SequenceModel
from retrieval.sequence_train import lr_factor, train_sequence_model
from tests.retrieval.test_sequence import IDS, N, cyclic_histories

COSINE = SequenceConfig(
    hidden=16, max_len=8, heads=2, dropout=0.0, lr=1e-2, max_epochs=10, patience=10, holdout_frac=0.1,
    lr_schedule="cosine", warmup_frac=0.05, label_smoothing=0.05,
)  # fmt: skip


@pytest.fixture(scope="module")
def cosine_model() -> SequenceModel:
    return train_sequence_model(cyclic_histories(400, seed=0), IDS, config=COSINE, show_progress=False, threads=1)


def test_cosine_training_decays_lr_to_zero_over_the_planned_epochs_and_still_learns(cosine_model: SequenceModel):
    curve = cosine_model.meta["train"]["curve"]
    assert len(curve) == COSINE.max_epochs  # patience = max_epochs: every planned epoch ran
    lrs = [c["lr_end"] for c in curve]
    assert all(b < a for a, b in zip(lrs, lrs[1:]))  # decays every epoch after the warmup (half an epoch here)
    assert lrs[0] < COSINE.lr and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert curve[-1]["loss"] < 0.5 * curve[0]["loss"]
    tests = cyclic_histories(200, seed=1)
    hits = sum(int(cosine_model.top_n([IDS.index(a) for a in h[:-1]], 1)[0]) == IDS.index(h[-1]) for h in tests)
    assert hits / len(tests) > 10 / N


def test_the_constant_schedule_keeps_lr(cosine_model: SequenceModel):
    cfg = replace(COSINE, lr_schedule="constant", warmup_frac=0.0, max_epochs=2, patience=2)
    m = train_sequence_model(cyclic_histories(100, seed=0), IDS, config=cfg, show_progress=False, threads=1)
    assert [c["lr_end"] for c in m.meta["train"]["curve"]] == [cfg.lr, cfg.lr]


def test_lr_factor_warms_up_linearly_then_follows_the_cosine():
    f = lr_factor(replace(COSINE, warmup_frac=0.1), planned_steps=100)
    assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)
    assert f(10 + 90 // 3) == pytest.approx(0.5 * (1 + math.cos(math.pi / 3)))
    g = lr_factor(replace(COSINE, lr_schedule="constant", warmup_frac=0.0), planned_steps=100)
    assert {g(s) for s in range(0, 120, 7)} == {1.0}


def test_the_cosine_model_reloads_and_scores_identically(cosine_model: SequenceModel, tmp_path: Path):
    cosine_model.save(tmp_path / "seq")
    back = SequenceModel.load(tmp_path / "seq", IDS)
    assert back.config == cosine_model.config and back.config.lr_schedule == "cosine"
    for hist in ([0], [3, 4, 5], [20, 21, 22, 23, 0, 1, 2, 3, 4, 5]):
        np.testing.assert_array_equal(back.scores(hist), cosine_model.scores(hist))


def test_the_digest_ignores_the_new_options_only_at_their_old_values():
    """Models saved before the options existed were keyed by the other fields alone: that key must hold."""
    old = SequenceConfig(text_init=True, lr_schedule="constant", warmup_frac=0.0, label_smoothing=0.0)
    legacy = {k: v for k, v in asdict(old).items() if k not in ("lr_schedule", "warmup_frac", "label_smoothing")}
    assert old.digest() == hashlib.sha256(json.dumps(legacy, sort_keys=True).encode()).hexdigest()
    keys = {old.digest()} | {
        replace(old, **kw).digest() for kw in ({"lr_schedule": "cosine"}, {"warmup_frac": 0.05}, {"label_smoothing": 0.1})
    }
    assert len(keys) == 4
    with pytest.raises(ValueError):
        SequenceConfig(lr_schedule="step")
