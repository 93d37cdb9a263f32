"""Training the next-item sequence model (torch, CPU) from histories only — never from `clicked`.

SASRec-style: item embedding (optionally a learned projection of the MiniLM title vectors plus a free
residual, so items start where their titles are) + learned positions, `blocks` pre-LN causal
self-attention blocks, a final LayerNorm, and the item matrix tied as the output layer. Every prefix
of a history predicts its next item. Loss: full softmax over the catalog ("ce") or a softmax over
uniform negatives shared by the batch ("sampled"). A seeded share of the distinct histories is held
out: each epoch ranks their last item from the rest (full catalog, the rest excluded) and training
stops when nDCG@10 has not improved for `patience` epochs; the best epoch's weights are kept.

Batches hold sequences of one length (no padding): histories are short (mean ~7), so this is the cheap
layout, and serving (one history, its exact length) sees what training saw.
"""
from __future__ import annotations

import copy
import logging
import math
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from retrieval.sequence import SequenceConfig, SequenceModel, history_rows, ids_digest

log = logging.getLogger(__name__)


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ff1, self.ff2 = nn.Linear(d, d), nn.Linear(d, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (t.view(B, L, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.out(a.transpose(1, 2).reshape(B, L, d)))
        return x + self.drop(self.ff2(self.drop(F.relu(self.ff1(self.ln2(x))))))


class SASRec(nn.Module):
    def __init__(self, n_items: int, cfg: SequenceConfig, text_vectors: np.ndarray | None = None):
        super().__init__()
        d = cfg.hidden
        self.cfg = cfg
        self.item = nn.Parameter(torch.randn(n_items, d) / math.sqrt(d))
        self.text: torch.Tensor | None = None
        if cfg.text_init:
            if text_vectors is None or len(text_vectors) != n_items:
                raise ValueError("text_init needs one text vector per catalog row")
            self.text = torch.as_tensor(np.ascontiguousarray(text_vectors, dtype=np.float32))
            self.proj = nn.Parameter(torch.randn(self.text.shape[1], d) / math.sqrt(d))
            nn.init.zeros_(self.item)  # the residual starts at zero: items start at their projected titles
        self.pos = nn.Parameter(torch.randn(cfg.max_len, d) * 0.02)
        self.blocks = nn.ModuleList(_Block(d, cfg.heads, cfg.dropout) for _ in range(cfg.blocks))
        self.lnf = nn.LayerNorm(d)
        self.drop = nn.Dropout(cfg.dropout)

    def item_matrix(self) -> torch.Tensor:
        return self.item if self.text is None else self.text @ self.proj + self.item

    def forward(self, seq: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """(B, L) item rows, no padding -> (B, L, d) states; `items` is item_matrix()."""
        L = seq.shape[1]
        x = self.drop(items[seq] * math.sqrt(self.cfg.hidden) + self.pos[self.cfg.max_len - L :])
        for b in self.blocks:
            x = b(x)
        return self.lnf(x)

    @torch.no_grad()
    def export_arrays(self) -> dict[str, np.ndarray]:
        """float32 arrays in the layout retrieval.sequence.SequenceModel serves (weights transposed)."""
        a = {"items": self.item_matrix(), "pos": self.pos, "lnf_w": self.lnf.weight, "lnf_b": self.lnf.bias}
        for i, b in enumerate(self.blocks):
            a |= {
                f"b{i}.ln1_w": b.ln1.weight, f"b{i}.ln1_b": b.ln1.bias, f"b{i}.ln2_w": b.ln2.weight, f"b{i}.ln2_b": b.ln2.bias,
                f"b{i}.wqkv": b.qkv.weight.T, f"b{i}.bqkv": b.qkv.bias, f"b{i}.wo": b.out.weight.T, f"b{i}.bo": b.out.bias,
                f"b{i}.w1": b.ff1.weight.T, f"b{i}.b1": b.ff1.bias, f"b{i}.w2": b.ff2.weight.T, f"b{i}.b2": b.ff2.bias,
            }  # fmt: skip
        return {k: np.ascontiguousarray(v.detach().cpu().numpy(), dtype=np.float32) for k, v in a.items()}


def _batches(seqs: list[list[int]], *, max_len: int, batch_tokens: int, rng: np.random.Generator | None):
    """(inputs, targets) LongTensor pairs: sequences grouped by input length, shuffled when rng is given."""
    by_len: dict[int, list[list[int]]] = {}
    for s in seqs:
        s = s[-(max_len + 1) :]
        if len(s) >= 2:
            by_len.setdefault(len(s) - 1, []).append(s)
    out = []
    for L, group in by_len.items():
        order = rng.permutation(len(group)) if rng is not None else np.arange(len(group))
        size = max(1, batch_tokens // L)
        for start in range(0, len(group), size):
            arr = torch.tensor([group[j] for j in order[start : start + size]], dtype=torch.long)
            out.append((arr[:, :-1], arr[:, 1:]))
    if rng is not None:
        out = [out[j] for j in rng.permutation(len(out))]
    return out


@torch.no_grad()
def _holdout_ndcg(model: SASRec, seqs: list[list[int]], cfg: SequenceConfig) -> float:
    """Mean nDCG@10 of each held-out history's last item, ranked over the catalog from the rest (rest excluded)."""
    if not seqs:
        return float("nan")
    model.eval()
    items = model.item_matrix()
    total = 0.0
    for inp, tgt in _batches(seqs, max_len=cfg.max_len, batch_tokens=4096, rng=None):
        u = model(inp, items)[:, -1]
        s = u @ items.T
        target = tgt[:, -1]
        pos = s.gather(1, target[:, None])
        s.scatter_(1, inp, float("-inf"))
        rank = (s > pos).sum(dim=1) + 1
        rank = torch.where((inp == target[:, None]).any(dim=1), torch.full_like(rank, 10**9), rank)  # repeat: excluded
        total += float(torch.where(rank <= 10, 1.0 / torch.log2(rank.double() + 1.0), 0.0).sum())
    return total / len(seqs)


def lr_factor(cfg: SequenceConfig, *, planned_steps: int):
    """Step -> multiplier of cfg.lr: linear warmup over warmup_frac of the planned steps, then constant or a
    cosine decay reaching 0 at the last planned step."""
    warm = int(round(cfg.warmup_frac * planned_steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, planned_steps - warm))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _loss(model: SASRec, inp: torch.Tensor, tgt: torch.Tensor, cfg: SequenceConfig, gen: torch.Generator) -> torch.Tensor:
    items = model.item_matrix()
    h = model(inp, items).reshape(-1, cfg.hidden)
    t = tgt.reshape(-1)
    if cfg.loss == "ce":
        return F.cross_entropy(h @ items.T, t, label_smoothing=cfg.label_smoothing)
    negs = torch.randint(0, items.shape[0], (cfg.negatives,), generator=gen)
    pos = (h * items[t]).sum(-1, keepdim=True)
    neg = (h @ items[negs].T).masked_fill(negs[None, :] == t[:, None], float("-inf"))
    return F.cross_entropy(torch.cat([pos, neg], dim=1), torch.zeros(len(t), dtype=torch.long))


def train_sequence_model(
    histories: Sequence[Sequence[str]],
    ids: Sequence[str],
    *,
    config: SequenceConfig = SequenceConfig(),
    text_vectors: np.ndarray | None = None,
    show_progress: bool | None = None,
    threads: int | None = None,
) -> SequenceModel:
    """Train on every prefix of the histories (ids in catalog row order); meta["train"] is the report."""
    cfg = config
    if show_progress is None:
        show_progress = sys.stderr.isatty()
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        seqs = [s for s in history_rows(histories, ids) if len(s) >= 2]
        n_hold = int(round(len(seqs) * cfg.holdout_frac)) if len(seqs) >= 2 else 0
        perm = rng.permutation(len(seqs))
        hold = [seqs[j] for j in perm[:n_hold]]
        train = [seqs[j] for j in perm[n_hold:]]
        model = SASRec(len(ids), cfg, text_vectors)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps_per_epoch = len(_batches(train, max_len=cfg.max_len, batch_tokens=cfg.batch_tokens, rng=None))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, planned_steps=cfg.max_epochs * steps_per_epoch))
        from tqdm import tqdm

        t0 = time.perf_counter()
        best, best_state, best_epoch, bad = -1.0, None, 0, 0
        curve: list[dict] = []
        for epoch in range(1, cfg.max_epochs + 1):
            model.train()
            batches = _batches(train, max_len=cfg.max_len, batch_tokens=cfg.batch_tokens, rng=rng)
            run, seen = 0.0, 0
            with tqdm(batches, desc=f"sequence epoch {epoch}", unit="batch", disable=not show_progress, leave=False) as bar:
                for inp, tgt in bar:
                    loss = _loss(model, inp, tgt, cfg, gen)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    run += float(loss.detach()) * tgt.numel()
                    seen += tgt.numel()
                    bar.set_postfix(loss=f"{run / max(seen, 1):.3f}")
            score = _holdout_ndcg(model, hold, cfg)
            elapsed = time.perf_counter() - t0
            curve.append({
                "epoch": epoch, "loss": run / max(seen, 1), "holdout_ndcg10": score, "seconds": round(elapsed, 1),
                "lr_end": opt.param_groups[0]["lr"],
            })  # fmt: skip
            log.info("sequence epoch %d: loss %.4f holdout nDCG@10 %.4f (%.0fs)", epoch, curve[-1]["loss"], score, elapsed)
            if not hold or score > best:
                best, best_epoch, bad = score, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad += 1
            if bad >= cfg.patience or (cfg.max_train_seconds is not None and elapsed >= cfg.max_train_seconds):
                break
        if best_state is not None:
            model.load_state_dict(best_state)
        model.eval()
        report = {
            "train_histories": len(train), "holdout_histories": len(hold),
            "targets": sum(min(len(s), cfg.max_len + 1) - 1 for s in train),
            "best_epoch": best_epoch, "holdout_ndcg10": best, "seconds": round(time.perf_counter() - t0, 1),
            "threads": torch.get_num_threads(), "curve": curve,
        }  # fmt: skip
        return SequenceModel(cfg, model.export_arrays(), ids_digest(ids), len(ids), {"train": report})
    finally:
        torch.set_num_threads(old_threads)
