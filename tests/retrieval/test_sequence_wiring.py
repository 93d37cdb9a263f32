"""The sequence model in the pipeline: trained through the ingest path, its score a prior feature, its top
next items a candidate source (demo catalog, a small model)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from kernel.settings import REPO_ROOT
from retrieval.features import FEATURES, SEQUENCE, build_profile
from retrieval.ingest import SEQUENCE_DIR, learn_sequence
from retrieval.sequence import SequenceConfig, SequenceModel

DEMO = REPO_ROOT / "data" / "demo" / "impressions.jsonl"
SMALL = SequenceConfig(hidden=16, max_len=8, dropout=0.0, max_epochs=4, patience=4, holdout_frac=0.1, text_init=True)
HISTORY = ["run-007", "run-005", "run-001"]


@pytest.fixture(scope="module")
def learned(demo_services, tmp_path_factory) -> tuple[SequenceModel, Path]:
    bdir = tmp_path_factory.mktemp("behaviour")
    model = learn_sequence(history_paths=[DEMO], index=demo_services.index, behaviour_dir=bdir, config=SMALL, show_progress=False, threads=1)
    return model, bdir


def test_ingest_path_trains_saves_and_then_reuses(learned, demo_services):
    model, bdir = learned
    assert model.meta["reused"] is False and model.n_items == len(demo_services.index)
    curve = model.meta["train"]["curve"]
    assert curve[-1]["loss"] < curve[0]["loss"]
    again = learn_sequence(history_paths=[DEMO], index=demo_services.index, behaviour_dir=bdir, config=SMALL, show_progress=False)
    assert again.meta["reused"] is True
    assert (bdir / SEQUENCE_DIR / "sequence.json").exists()
    rows, _ = demo_services.index.rows(HISTORY)
    np.testing.assert_array_equal(again.scores(rows), model.scores(rows))


def _profile(services, history):
    rows, _ = services.index.rows(history)
    return build_profile(services.index, rows, decay=services.selector.recency_decay), rows


def test_the_sequence_feature_is_the_models_score_for_each_candidate(learned, demo_services):
    model, _ = learned
    gen = replace(demo_services.selector.generator, sequence=model)
    profile, rows = _profile(demo_services, HISTORY)
    want = model.scores(rows)
    logged = gen.score_logged(profile, list(range(0, 300, 7)))
    assert FEATURES[SEQUENCE] == "sequence"
    np.testing.assert_allclose(logged.features[:, SEQUENCE], want[logged.rows], rtol=1e-6)
    assert np.count_nonzero(logged.features[:, SEQUENCE]) == len(logged.rows)
    generated = gen.generate(profile, exclude=set(rows))
    np.testing.assert_allclose(generated.features[:, SEQUENCE], want[generated.rows], rtol=1e-6)
    # without a model (or without a history) the column is 0
    assert not replace(gen, sequence=None).score_logged(profile, list(logged.rows)).features[:, SEQUENCE].any()
    empty, _ = _profile(demo_services, [])
    assert not gen.score_logged(empty, list(logged.rows)).features[:, SEQUENCE].any()


def test_the_sequence_source_adds_the_models_top_items(learned, demo_services):
    model, _ = learned
    small = replace(demo_services.selector.generator, n_dense=3, n_covisit=3, n_cf=3, n_popular=0, sequence=model, n_sequence=10)
    profile, rows = _profile(demo_services, HISTORY)
    exclude = set(rows)
    with_seq = small.generate(profile, exclude=exclude)
    without = replace(small, sequence=None).generate(profile, exclude=exclude)
    top = [int(r) for r in model.top_n(rows, 10, exclude=exclude)]
    assert set(top) <= set(with_seq.rows.tolist())
    assert all("sequence" in with_seq.sources[r] for r in top)
    assert set(without.rows.tolist()) < set(with_seq.rows.tolist())  # strictly more candidates
    assert not any("sequence" in s for s in without.sources.values())
    assert not exclude & set(with_seq.rows.tolist())


def test_ingest_trains_the_benched_default_config(monkeypatch):
    """The settings' defaults give ingest the SequenceConfig defaults (plus text init): the model the README's
    sequence table measures with `bench/sequence_quality.py --text-init` is the one ingest trains and reuses."""
    import os

    from kernel.settings import Settings
    from selection.services import sequence_config

    for key in [k for k in os.environ if k.startswith("ADSELECT_")]:  # the defaults, not a test session's overrides
        monkeypatch.delenv(key)  # (tests/eval/conftest.py sets ADSELECT_SEQUENCE_MAX_EPOCHS=1 for the whole session)
    assert sequence_config(Settings(_env_file=None)) == SequenceConfig(text_init=True)
