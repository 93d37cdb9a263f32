"""Behaviour learning on Ray (`adselect ingest --ray --history`): histories partitioned over the actors of a
local Ray (2 CPUs), each counting with the single-process BehaviourCounter, merged in the driver: every
table equal, array for array, to the single-process one."""
from __future__ import annotations

import numpy as np
import pytest

from retrieval.behaviour import BehaviourStats
from tests.retrieval.test_behaviour_scaling import random_histories

import ray  # noqa: E402 - a real dependency (the ray extra): missing, the tests fail, never skip


@pytest.fixture(scope="module")
def local_ray():
    from eval.distributed import ray_session

    with ray_session() as info:  # ray.shutdown() on exit
        yield info
    assert not ray.is_initialized()


def assert_same_tables(a: BehaviourStats, b: BehaviourStats) -> None:
    assert a.ids == b.ids and a.n_histories == b.n_histories and (a.window, a.decay) == (b.window, b.decay)
    np.testing.assert_array_equal(a.popularity, b.popularity)
    assert a.popularity.dtype == b.popularity.dtype
    for name in ("forward", "symmetric"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape
        for part in ("indptr", "indices", "data"):
            np.testing.assert_array_equal(getattr(x, part), getattr(y, part), err_msg=f"{name}.{part}")
    assert (a.cf is None) == (b.cf is None)
    if a.cf is not None:
        assert a.cf.dtype == b.cf.dtype
        np.testing.assert_array_equal(a.cf, b.cf)


def test_counts_on_ray_give_the_single_process_tables(local_ray) -> None:
    """Duplicated histories (also once unknown ids are dropped), empty ones, repeats; chunks of a few events,
    so each actor gets many: the duplicates must still meet on one actor and count once."""
    from eval.distributed.behaviour import RayBehaviourCounter

    ids, hists = random_histories(5, n_ids=120, n=700)
    window, decay, dims = 6, 0.7, 8
    single = BehaviourStats.learn(hists, ids, window=window, decay=decay, cf_dims=dims)
    counter = RayBehaviourCounter(workers=2, chunk_events=40)
    counts = counter(iter(hists), ids, window=window, decay=decay)
    on_ray = BehaviourStats.from_counts(counts, ids, window=window, decay=decay, cf_dims=dims)
    assert single.n_histories < len(hists)  # the duplicates were dropped ...
    assert_same_tables(single, on_ray)  # ... on the actors too, once each
