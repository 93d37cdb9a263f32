"""Eval tasks as data: a YAML file names the dataset, the protocol options, the systems and the LLM variant.

A variant is `include: other.yaml` plus only the fields that change; mappings merge recursively, any
other value (lists included) replaces the included one. Relative data paths resolve against the
repository root (so `../shared/data/...` works from any working directory); `include` resolves
against the including file's folder. `load_task` validates the merged document (unknown keys are
errors); `validate_task` also checks what exists outside the file (data files, prompt, weights,
system and metric names) without running anything.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kernel.errors import UnknownName, UserError
from kernel.settings import REPO_ROOT

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


class TaskError(UserError):
    """An eval task file is missing, malformed, or names something that does not exist."""

    code = "eval_task_invalid"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSpec(_Strict):
    ads: Path | None = None
    impressions: Path | None = None
    train: list[Path] = Field(default_factory=list, description="Behaviour is learned from these histories; empty = the evaluated impressions.")
    limit: int | None = Field(None, ge=1, description="Evaluate only the first N impressions of the file.")

    @field_validator("train", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        if v is None:
            return []
        return [v] if isinstance(v, (str, Path)) else v


class ProtocolSpec(_Strict):
    n_retrieve: int = Field(100, ge=1, le=10000, description="Full catalog: how many ads each baseline returns.")
    recall_ks: list[int] = Field(default_factory=lambda: [20, 50, 100])
    use_chroma: bool = Field(True, description="Full catalog: nearest neighbours from Chroma (as served) or exact numpy.")
    seed: int = Field(0, description="Random baseline and tie-breaking.")
    workers: int = Field(
        0, ge=0, le=64,
        description="Fast-path processes (forked after loading; they never touch Chroma); 0 = one per CPU, at most 4, for 2,000+ impressions.",
    )


class FusionSpec(_Strict):
    weights: Path | None = Field(None, description="Fusion weights JSON; null = data_dir/fusion.json, else the shipped weights.")


class LLMSpec(_Strict):
    url: str | None = Field(None, description="OpenAI-compatible base URL; null = start the bundled llama.cpp server.")
    model: str = "smollm2-135m-instruct"
    prompt: str = "rerank"
    structured: Literal["json_schema", "json_object"] = "json_object"
    temperature: float = Field(0.0, ge=0, le=2)
    max_tokens: int = Field(256, ge=16, le=4096)
    max_candidates: int | None = Field(
        None, ge=2, le=50,
        description="Top-N by prior sent to the LLM; null = as the endpoint (Settings.llm_candidates: the bundled model gets min(llm_max_candidates, local_llm_max_candidates), a server at a URL llm_max_candidates).",
    )
    timeout_s: float = Field(120.0, gt=0, description="Per impression (the deadline given to the pipeline).")
    concurrency: int = Field(4, ge=1, le=256)
    sample: int | None = Field(None, ge=1, description="Run the LLM systems on N impressions drawn with `sample_seed`.")
    sample_seed: int = 0
    rewrite: bool = Field(False, description="Ask for ad copy too (longer outputs; ranking is what is scored).")
    position_bias: bool = True
    cache: bool = True


class VariantSpec(_Strict):
    """One LLM variant of a side-by-side run: the task's `llm` block with only these fields changed.

    Each variant runs on the same LLM sample as a system of its own (`llm@NAME`, `default+llm@NAME`),
    sharing the LLM cache with the others (identical calls are made once). `mode` and `settings` are
    Settings overrides (`mode` = `llm_mode`), applied to the service settings the variant's Selector is
    built from, so a variant is what the endpoint would serve with those environment variables."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,40}$")
    prompt: str | None = Field(None, description="Template under prompts/ (default: llm.prompt).")
    model: str | None = None
    url: str | None = None
    mode: Literal["listwise", "score"] | None = Field(None, description="ADSELECT_LLM_MODE for this variant.")
    structured: Literal["json_schema", "json_object"] | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int | None = Field(None, ge=1, le=4096)
    settings: dict[str, Any] = Field(default_factory=dict, description="Other Settings overrides (e.g. score_permutations).")

    def llm_spec(self, base: LLMSpec) -> LLMSpec:
        fields = ("prompt", "model", "url", "structured", "temperature", "max_tokens")
        return base.model_copy(update={f: getattr(self, f) for f in fields if getattr(self, f) is not None})

    def settings_overrides(self) -> dict[str, Any]:
        return {**self.settings, **({"llm_mode": self.mode} if self.mode is not None else {})}


class BootstrapSpec(_Strict):
    n_boot: int = Field(1000, ge=10, le=100000)
    seed: int = 0
    level: float = Field(0.95, gt=0, lt=1)


class EvalTask(_Strict):
    name: str = "adhoc"
    description: str = ""
    data: DataSpec = Field(default_factory=DataSpec)
    protocol: ProtocolSpec = Field(default_factory=ProtocolSpec)
    systems: list[str] = Field(default_factory=lambda: list(DEFAULT_SYSTEMS))
    fusion: FusionSpec = Field(default_factory=FusionSpec)
    llm: LLMSpec = Field(default_factory=LLMSpec)
    variants: list[VariantSpec] = Field(
        default_factory=list, description="LLM variants run side by side on the LLM sample, each vs the others (paired)."
    )
    no_llm: bool = Field(False, description="Skip the LLM systems (they are reported as not run).")
    bootstrap: BootstrapSpec = Field(default_factory=BootstrapSpec)

    def to_jsonable(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json())

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.to_jsonable(), sort_keys=True).encode()).hexdigest()


DEFAULT_SYSTEMS = ("random", "popularity", "bm25", "dense", "covisit", "sequence", "default", "served", "llm", "default+llm")


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TaskError(f"{path}: task file not found") from None
    except yaml.YAMLError as e:
        raise TaskError(f"{path}: not valid YAML: {e}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise TaskError(f"{path}: expected a mapping at top level")
    return doc


def load_document(path: Path, *, _stack: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The merged YAML document of `path` with its `include` chain resolved (not yet validated)."""
    path = Path(path).resolve()
    if path in _stack:
        chain = " -> ".join(p.name for p in (*_stack, path))
        raise TaskError(f"{path}: include cycle ({chain})")
    doc = _read_yaml(path)
    include = doc.pop("include", None)
    if include is None:
        return doc
    if not isinstance(include, str):
        raise TaskError(f"{path}: `include` must be one file name")
    base = load_document(path.parent / include, _stack=(*_stack, path))
    return deep_merge(base, doc)


def _format_errors(where: str, e: ValidationError) -> str:
    parts = [f"{'.'.join(map(str, err['loc'])) or '<root>'}: {err['msg']}" for err in e.errors()]
    return f"{where}: " + "; ".join(parts)


def task_from_document(doc: dict[str, Any], *, where: str = "<task>") -> EvalTask:
    try:
        return EvalTask.model_validate(doc)
    except ValidationError as e:
        raise TaskError(_format_errors(where, e)) from None


def find_task_file(name_or_path: str | Path) -> Path:
    """A path, or the name of a file in eval/tasks/ (with or without .yaml)."""
    p = Path(name_or_path)
    if p.exists():
        return p
    for cand in (TASKS_DIR / p.name, TASKS_DIR / f"{p.name}.yaml"):
        if cand.exists():
            return cand
    known = sorted(q.stem for q in TASKS_DIR.glob("*.yaml"))
    raise UnknownName("eval task", str(name_or_path), known)


def load_task(path: Path | str, *, overrides: dict[str, Any] | None = None) -> EvalTask:
    """Validated task: the file (+ includes), then `overrides` (e.g. from CLI options) merged on top."""
    file = find_task_file(path)
    doc = load_document(file)
    if overrides:
        doc = deep_merge(doc, overrides)
    return task_from_document(doc, where=str(file))


def resolve_path(p: Path | None) -> Path | None:
    if p is None:
        return None
    p = Path(p).expanduser()
    return p if p.is_absolute() else (REPO_ROOT / p)


def validate_task(task: EvalTask, *, prompts_dir: Path | None = None, require_data: bool = True) -> list[str]:
    """Problems found without running (empty = valid): data files, systems, prompt, weights, metric cut-offs."""
    from eval.systems import SYSTEMS, resolve_systems

    problems: list[str] = []
    if require_data:
        for label, p in (("data.ads", task.data.ads), ("data.impressions", task.data.impressions)):
            if p is None:
                problems.append(f"{label}: missing")
            elif not (resolve_path(p).is_file() or (label == "data.impressions" and resolve_path(p).is_dir())):  # a folder of parts: --ray
                problems.append(f"{label}: file not found: {resolve_path(p)}")
        for p in task.data.train:
            if not resolve_path(p).is_file():
                problems.append(f"data.train: file not found: {resolve_path(p)}")
    try:
        resolve_systems(task.systems)
    except UnknownName as e:
        problems.append(f"systems: {e}")
    if not task.systems:
        problems.append(f"systems: empty (known: {', '.join(SYSTEMS)})")
    for k in task.protocol.recall_ks:
        if f"recall@{k}" not in _metric_names():
            problems.append(f"protocol.recall_ks: recall@{k} is not a registered metric")
    if task.fusion.weights is not None:
        wp = resolve_path(task.fusion.weights)
        if not wp.is_file():
            problems.append(f"fusion.weights: file not found: {wp}")
        else:
            try:
                from selection.fusion import FusionModel

                FusionModel.from_json(json.loads(wp.read_text()))
            except (ValueError, KeyError, TypeError) as e:
                problems.append(f"fusion.weights: {wp}: {e}")
    wants_llm = not task.no_llm and any(s in ("llm", "default+llm") for s in task.systems)
    if wants_llm or (task.variants and not task.no_llm):
        from kernel.errors import PromptError
        from agent.prompts import PromptRegistry

        registry = PromptRegistry(prompts_dir or (REPO_ROOT / "prompts"))
        checks = [("llm.prompt", task.llm.prompt)] if wants_llm else []
        checks += [(f"variants.{v.name}.prompt", v.llm_spec(task.llm).prompt) for v in task.variants]
        for label, name in checks:
            try:
                registry.get(name)
            except (UnknownName, PromptError) as e:
                problems.append(f"{label}: {e}")
    names = [v.name for v in task.variants]
    if len(set(names)) != len(names):
        problems.append(f"variants: names repeat: {names}")
    for v in task.variants:
        from kernel.settings import Settings

        unknown = sorted(set(v.settings) - set(Settings.model_fields))
        if unknown:
            problems.append(f"variants.{v.name}.settings: unknown settings {unknown}")
            continue
        try:
            Settings(_env_file=None, **v.settings_overrides())
        except (ValidationError, TypeError) as e:
            problems.append(f"variants.{v.name}.settings: {str(e).splitlines()[0]}")
    return problems


def _metric_names() -> tuple[str, ...]:
    from eval.metrics import METRIC_NAMES

    return METRIC_NAMES
