"""The sequence model's batched forward pass: one pass per history length, the same bits as one at a time."""
from __future__ import annotations

import numpy as np
import torch

from retrieval.sequence import SequenceConfig, SequenceModel
from retrieval.sequence_train import SASRec

N = 24
CFG = SequenceConfig(hidden=16, max_len=8, heads=2, blocks=2)


class CountingSequenceModel(SequenceModel):
    """The real model, counting its forward passes (one per batch of one history length)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.passes: list[int] = []

    def _forward(self, h: np.ndarray) -> np.ndarray:
        self.passes.append(len(h))
        return super()._forward(h)


def _model() -> CountingSequenceModel:
    torch.manual_seed(5)
    net = SASRec(N, CFG).eval()
    with torch.no_grad():  # non-trivial weights, so a mixed-up batch row shows
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return CountingSequenceModel(CFG, net.export_arrays(), "h", N)


HISTORIES = [[3], [1, 2, 3], [], [4, 5, 6], list(range(12)), [7], [0, 9, 2], list(range(3, 15)), [2, 2, 2, 2]]


def test_a_batch_gives_each_history_the_bits_it_gets_alone_in_one_pass_per_length():
    m = _model()
    alone = [m.user_vector(h) for h in HISTORIES]
    m.passes.clear()
    batch = m.encode_histories(HISTORIES)
    # lengths after the cap at max_len: 1, 3, 3, 8, 1, 3, 8, 4 (and one empty history)
    assert sorted(m.passes) == [1, 2, 2, 3]
    for h, a, b in zip(HISTORIES, alone, batch):
        if not h:
            assert a is None and b is None
        else:
            assert a.tobytes() == b.tobytes(), h


def test_primed_histories_are_read_from_the_batch_and_forgotten_after():
    m = _model()
    want = {tuple(h): m.user_vector(h).tobytes() for h in HISTORIES if h}
    m.passes.clear()
    with m.primed(HISTORIES):
        n = len(m.passes)
        got = [m.user_vector(np.asarray(h)) for h in HISTORIES if h]
        assert len(m.passes) == n  # no pass beyond the batch's
        assert m.scores([1, 2, 3]).tobytes() == (m.items @ m.user_vector([1, 2, 3])).tobytes()
    assert [g.tobytes() for g in got] == [want[tuple(h)] for h in HISTORIES if h]
    m.passes.clear()
    m.user_vector([1, 2, 3])
    assert m.passes == [1]  # computed again once the block ends
