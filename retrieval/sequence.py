"""Next-item sequence model (SASRec-style self-attention over a history): serving, persistence, reuse.

Trained by `retrieval.sequence_train` (torch) from histories only (never `clicked`); served here in
numpy, without torch: one request is a forward pass over at most `max_len` positions (2 small
attention blocks) and one (n_items x hidden) matrix-vector product against the item embeddings.

State is a directory beside the other behaviour tables (`arrays.npz` + `sequence.json`). The JSON
holds the config, the hash of the catalog ids (in row order) the item rows belong to, the hash of the
training histories and of the text vectors used to initialise items; `train_or_load` reuses the saved
model when all of them are unchanged, and `SequenceModel.load` refuses a model built for other rows.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from kernel.errors import SequenceModelMismatch

log = logging.getLogger(__name__)

STATE_FILE = "sequence.json"
ARRAYS_FILE = "arrays.npz"
LN_EPS = 1e-5  # torch.nn.LayerNorm's default: serving must match training
LOSSES = ("ce", "sampled")  # full softmax over the catalog | softmax over shared uniform negatives
LR_SCHEDULES = ("constant", "cosine")  # per optimizer step, after a linear warmup of `warmup_frac` of all steps
# Options added after models were saved and shipped: at these values they are left out of the digest, so
# a saved model keeps its key (a model trained without the option is the model with the option at this value).
_DIGEST_OMITS_AT = {"lr_schedule": "constant", "warmup_frac": 0.0, "label_smoothing": 0.0}


@dataclass(frozen=True)
class SequenceConfig:
    hidden: int = 64
    max_len: int = 50  # positions; histories are capped at 50 items
    blocks: int = 2
    heads: int = 1
    dropout: float = 0.2
    lr: float = 3e-3
    weight_decay: float = 0.0  # AdamW's decoupled weight decay (0: plain Adam)
    loss: str = "ce"  # full softmax; on Games held-out nDCG@10 0.0711 vs 0.0592 for "sampled" (README, sequence tries)
    negatives: int = 1024  # loss="sampled": uniform negatives shared by one batch
    batch_tokens: int = 2048  # predicted positions per batch (batches are bucketed by length)
    max_epochs: int = 10  # the planned epochs: the cosine schedule reaches lr 0 at the end of the last
    patience: int = 3  # epochs without a better held-out nDCG@10 before stopping
    holdout_frac: float = 0.05  # share of the (distinct) training histories held out for early stopping
    text_init: bool = False  # item vectors = learned projection of the title vectors + a free residual
    seed: int = 0
    max_train_seconds: float | None = 3000.0  # stop after the epoch that crosses this budget (None: epochs only)
    # lr decays to 0 over max_epochs (the planned steps; a budget stop cuts it): on Games held-out nDCG@10 0.0737
    # vs 0.0712 for "constant", `default` full-catalog nDCG@10 0.0835 vs 0.0813 (README, sequence tries)
    lr_schedule: str = "cosine"
    warmup_frac: float = 0.05  # share of the planned steps over which lr rises linearly from 0 (either schedule)
    label_smoothing: float = 0.0  # loss="ce": torch cross_entropy's label smoothing

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not 0.0 <= self.warmup_frac < 1.0:
            raise ValueError(f"warmup_frac must be in [0, 1), got {self.warmup_frac}")
        if self.hidden % self.heads:
            raise ValueError("hidden must be a multiple of heads")

    def digest(self) -> str:
        d = {k: v for k, v in asdict(self).items() if k not in _DIGEST_OMITS_AT or v != _DIGEST_OMITS_AT[k]}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def ids_digest(ids: Sequence[str]) -> str:
    """The catalog ids in row order: item row r of the model is catalog row r."""
    h = hashlib.sha256()
    for a in ids:
        h.update(a.encode())
        h.update(b"\n")
    return h.hexdigest()


def histories_digest(histories: Iterable[Sequence[str]]) -> str:
    h = hashlib.sha256()
    for hist in histories:
        h.update("\x1f".join(hist).encode())
        h.update(b"\n")
    return h.hexdigest()


def vectors_digest(vectors: np.ndarray | None) -> str | None:
    if vectors is None:
        return None
    return hashlib.sha256(np.ascontiguousarray(vectors, dtype=np.float32).tobytes()).hexdigest()


def history_rows(histories: Iterable[Sequence[str]], ids: Sequence[str]) -> list[list[int]]:
    """Distinct histories as catalog rows (unknown ids dropped, empty ones skipped), first-seen order.

    Users appear in several logged impressions with the same history; each distinct one counts once."""
    row = {a: i for i, a in enumerate(ids)}
    seen: set[tuple[int, ...]] = set()
    out: list[list[int]] = []
    for hist in histories:
        seq = tuple(row[a] for a in hist if a in row)
        if seq and seq not in seen:
            seen.add(seq)
            out.append(list(seq))
    return out


# ---- numpy forward pass (mirrors sequence_train.SASRec in eval mode) -------------------------------------
def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    mu = x.mean(axis=-1, keepdims=True)
    xc = x - mu
    var = (xc * xc).mean(axis=-1, keepdims=True)
    return xc / np.sqrt(var + LN_EPS) * w + b


def _softmax_rows(a: np.ndarray) -> np.ndarray:
    a = a - a.max(axis=-1, keepdims=True)
    np.exp(a, out=a)
    a /= a.sum(axis=-1, keepdims=True)
    return a


@dataclass
class SequenceModel:
    """Scores every catalog row as the next item after a history (catalog rows, oldest first)."""

    config: SequenceConfig
    arrays: dict[str, np.ndarray]  # float32; names as in sequence_train.SASRec.export_arrays()
    ids_hash: str
    n_items: int
    meta: dict = field(default_factory=dict)  # histories/vectors hashes, training report

    def __post_init__(self) -> None:
        a = self.arrays
        self.items = np.ascontiguousarray(a["items"], dtype=np.float32)  # (n_items, d)
        if self.items.shape != (self.n_items, self.config.hidden):
            raise ValueError(f"item matrix {self.items.shape} != ({self.n_items}, {self.config.hidden})")
        self._scale = np.float32(np.sqrt(self.config.hidden))
        self._head_scale = np.float32(np.sqrt(self.config.hidden // self.config.heads))
        self._causal: dict[int, np.ndarray] = {}  # history length -> (L, L) mask above the diagonal (read only)
        self._primed: dict[tuple[int, ...], np.ndarray | None] | None = None  # `primed`: states computed in one batch
        self._blocks = [
            tuple(a[f"b{i}.{k}"] for k in ("ln1_w", "ln1_b", "wqkv", "bqkv", "wo", "bo", "ln2_w", "ln2_b", "w1", "b1", "w2", "b2"))
            for i in range(self.config.blocks)
        ]

    def user_vector(self, history_rows: Sequence[int]) -> np.ndarray | None:
        """The model's (hidden,) state after the last item; None for an empty history.

        A history primed by `primed` is read from there (the same bits: `encode_histories` computed it)."""
        primed = self._primed  # read once: another thread's block may end meanwhile
        if primed is not None:
            u = primed.get(tuple(np.asarray(history_rows, dtype=np.int64)[-self.config.max_len :].tolist()))
            if u is not None:
                return u
        return self.encode_histories([history_rows])[0]

    def encode_histories(self, histories: Sequence[Sequence[int]]) -> list[np.ndarray | None]:
        """`user_vector` of many histories, THE forward pass: histories of one length (after the cap at
        `max_len`) go through it as one (B, L, hidden) batch; None for an empty history.

        Each matrix product is numpy's stacked matmul, one BLAS call per history of the batch, so a
        history's state has the same bits in a batch of 1 (the request path) as in a batch of many (eval)."""
        cap = self.config.max_len
        out: list[np.ndarray | None] = [None] * len(histories)
        by_len: dict[int, list[int]] = {}
        clipped: list[np.ndarray] = []
        for i, rows in enumerate(histories):
            h = np.asarray(rows, dtype=np.int64)[-cap:]
            clipped.append(h)
            if len(h):
                if h.min() < 0 or h.max() >= self.n_items:
                    raise IndexError("history row outside the catalog")
                by_len.setdefault(len(h), []).append(i)
        for L, members in by_len.items():
            states = self._forward(np.stack([clipped[i] for i in members]) if len(members) > 1 else clipped[members[0]][None])
            for j, i in enumerate(members):
                out[i] = states[j]
        return out

    @contextmanager
    def primed(self, histories: Iterable[Sequence[int]]):
        """Within the block, `user_vector` of these histories is read from one `encode_histories` batch."""
        hs = [np.asarray(h, dtype=np.int64)[-self.config.max_len :] for h in histories]
        hs = [h for h in hs if len(h)]
        keys = [tuple(h.tolist()) for h in hs]
        self._primed = dict(zip(keys, self.encode_histories(hs)))
        try:
            yield self
        finally:
            self._primed = None

    def _forward(self, h: np.ndarray) -> np.ndarray:
        """(B, hidden) final states of B histories of one length L: `h` is (B, L) catalog rows."""
        cfg = self.config
        L = h.shape[1]
        x = self.items[h] * self._scale + self.arrays["pos"][cfg.max_len - L :]  # (B, L, d)
        d, nh = cfg.hidden, cfg.heads
        dh = d // nh
        causal = self._causal.get(L)
        if causal is None:
            causal = self._causal[L] = np.triu(np.ones((L, L), dtype=bool), k=1)
        for i, (ln1_w, ln1_b, wqkv, bqkv, wo, bo, ln2_w, ln2_b, w1, b1, w2, b2) in enumerate(self._blocks):
            last = i == len(self._blocks) - 1  # the last block only needs the last query
            qkv = _layer_norm(x, ln1_w, ln1_b) @ wqkv + bqkv  # (B, L, 3d)
            q, k, v = qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :]
            if last:
                q, x = q[:, -1:], x[:, -1:]
            outs = []
            for hd in range(nh):
                sl = slice(hd * dh, (hd + 1) * dh)
                att = (q[..., sl] @ k[..., sl].swapaxes(-1, -2)) / self._head_scale
                if not last:
                    att[:, causal] = -np.inf
                outs.append(_softmax_rows(att) @ v[..., sl])
            x = x + (np.concatenate(outs, axis=-1) if nh > 1 else outs[0]) @ wo + bo
            hdn = np.maximum(_layer_norm(x, ln2_w, ln2_b) @ w1 + b1, 0.0)
            x = x + hdn @ w2 + b2
        return _layer_norm(x[:, -1], self.arrays["lnf_w"], self.arrays["lnf_b"]).astype(np.float32, copy=False)

    def scores(self, history_rows: Sequence[int]) -> np.ndarray:
        """(n_items,) float32 next-item logits for every catalog row; zeros for an empty history."""
        u = self.user_vector(history_rows)
        if u is None:
            return np.zeros(self.n_items, dtype=np.float32)
        return self.items @ u

    def top_n(self, history_rows: Sequence[int], n: int, *, exclude: Iterable[int] = ()) -> np.ndarray:
        """The n best rows by score, best first, without `exclude`; empty for an empty history."""
        if n <= 0 or len(history_rows) == 0:
            return np.zeros(0, dtype=np.int64)
        s = self.scores(history_rows)
        ex = np.fromiter(exclude, dtype=np.int64)
        if len(ex):
            s[ex] = -np.inf
        k = min(n, self.n_items - len(np.unique(ex)))
        if k <= 0:
            return np.zeros(0, dtype=np.int64)
        top = np.argpartition(-s, k - 1)[:k]
        return top[np.argsort(-s[top], kind="stable")]

    # ---- persistence -------------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / (ARRAYS_FILE + ".tmp.npz")
        np.savez(tmp, **self.arrays)
        tmp.replace(directory / ARRAYS_FILE)
        state = {"config": asdict(self.config), "ids_hash": self.ids_hash, "n_items": self.n_items, "meta": self.meta}
        (directory / (STATE_FILE + ".tmp")).write_text(json.dumps(state, indent=1, sort_keys=True))
        (directory / (STATE_FILE + ".tmp")).replace(directory / STATE_FILE)  # written last: marks the state complete

    @staticmethod
    def saved_state(directory: Path) -> dict | None:
        path = Path(directory) / STATE_FILE
        if not path.exists() or not (Path(directory) / ARRAYS_FILE).exists():
            return None
        return json.loads(path.read_text())

    @classmethod
    def load(cls, directory: Path, ids: Sequence[str]) -> "SequenceModel | None":
        """The saved model, None when nothing is saved; SequenceModelMismatch when built for other catalog rows."""
        state = cls.saved_state(directory)
        if state is None:
            return None
        want = ids_digest(ids)
        if state["ids_hash"] != want or state["n_items"] != len(ids):
            raise SequenceModelMismatch(str(directory), expected=want, found=state["ids_hash"])
        with np.load(Path(directory) / ARRAYS_FILE) as z:
            arrays = {k: np.ascontiguousarray(z[k], dtype=np.float32) for k in z.files}
        return cls(SequenceConfig(**state["config"]), arrays, state["ids_hash"], state["n_items"], state.get("meta", {}))


def train_or_load(
    *,
    histories: Sequence[Sequence[str]],
    ids: Sequence[str],
    directory: Path,
    config: SequenceConfig = SequenceConfig(),
    text_vectors: np.ndarray | None = None,
    show_progress: bool | None = None,
    threads: int | None = None,
    vectors_key: str | None = None,
) -> SequenceModel:
    """The model saved in `directory` if it was trained on these histories, catalog rows, config and text
    vectors; otherwise train one (torch) and save it there. `meta["reused"]` says which happened.

    `vectors_key` names the text vectors stably (what they were embedded from); default: their bytes'
    sha256 (vectors read back from a store can differ in the last bits between reads)."""
    key = {
        "ids_hash": ids_digest(ids),
        "histories_hash": histories_digest(histories),
        "config_hash": config.digest(),
        "vectors_hash": (vectors_key or vectors_digest(text_vectors)) if config.text_init else None,
    }
    state = SequenceModel.saved_state(directory)
    if state is not None and state["ids_hash"] == key["ids_hash"] and all(
        state.get("meta", {}).get(k) == v for k, v in key.items() if k != "ids_hash"
    ):
        model = SequenceModel.load(directory, ids)
        if model is not None:
            model.meta["reused"] = True
            log.info("sequence model reused", extra={"dir": str(directory)})
            return model
    from retrieval.sequence_train import train_sequence_model

    model = train_sequence_model(
        histories, ids, config=config, text_vectors=text_vectors, show_progress=show_progress, threads=threads
    )
    model.meta.update({k: v for k, v in key.items() if k != "ids_hash"})
    model.save(directory)
    model.meta["reused"] = False
    return model
