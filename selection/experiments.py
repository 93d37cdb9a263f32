"""Experiments: named arms with traffic shares, each arm a variant; users assigned by their keyed hash.

An experiment file (YAML or JSON):

    name: fusion-vs-llm            # also the salt of the assignment: a new name reshuffles users
    arms:
      - name: default
        share: 0.8
        variant: {}                # the service's own settings
      - name: explore
        share: 0.1
        variant:
          exploration: {method: softmax, temperature: 0.5, top_m: 5}
      - name: no-llm
        share: 0.1
        variant: {llm: false, weights: weights/no_llm.json, prompt: rerank}

A variant overrides only what it names: `weights` (a fusion weights file, relative to the experiment
file), `prompt` (a template name under prompts/), `llm` (on/off) and `exploration`
(selection.exploration.ExplorationConfig). Unknown keys are refused; shares must be positive and sum
to 1. Assignment is deterministic: `u = SHA-256(name ":" user_key)` read as a fraction in [0, 1), and the
arm whose cumulative share interval holds `u` serves the user — the same user key always gets the same arm,
in every process, and shares are honoured up to sampling noise.
"""
from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Collection
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kernel.errors import ExperimentError, UnknownName
from selection.exploration import OFF, ExplorationConfig

DEFAULT_ARM = "default"
SHARE_TOLERANCE = 1e-9
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class Variant(BaseModel):
    """What an arm changes; None = the service's setting."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weights: Path | None = Field(None, description="Fusion weights JSON (relative paths: from the experiment file).")
    prompt: str | None = Field(None, min_length=1, max_length=64, description="Prompt template name under prompts/.")
    llm: bool | None = Field(None, description="LLM stage on/off for this arm.")
    exploration: ExplorationConfig = OFF


class Arm(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=_NAME)
    share: float = Field(gt=0.0, le=1.0)
    variant: Variant = Variant()


class Experiment(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=_NAME)
    arms: list[Arm] = Field(min_length=1, max_length=64)

    @field_validator("arms")
    @classmethod
    def _unique_names(cls, arms: list[Arm]) -> list[Arm]:
        names = [a.name for a in arms]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"arm names must be unique; repeated: {', '.join(dup)}")
        return arms

    @model_validator(mode="after")
    def _shares_sum_to_one(self) -> "Experiment":
        total = sum(a.share for a in self.arms)
        if abs(total - 1.0) > SHARE_TOLERANCE:
            raise ValueError(f"arm shares must sum to 1, they sum to {total:g}")
        return self

    @classmethod
    def single(cls, name: str = DEFAULT_ARM, variant: Variant | None = None) -> "Experiment":
        """No experiment: every user on one arm (named "default")."""
        return cls(name=name, arms=[Arm(name=DEFAULT_ARM, share=1.0, variant=variant or Variant())])

    def arm(self, name: str) -> Arm:
        for a in self.arms:
            if a.name == name:
                return a
        raise UnknownName("arm", name, [a.name for a in self.arms])

    def bucket(self, user_key: str) -> float:
        """The user's point in [0, 1): the first 8 bytes of SHA-256(name:user_key) over 2**64."""
        digest = hashlib.sha256(f"{self.name}:{user_key}".encode("utf-8")).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    def assign(self, user_key: str) -> Arm:
        """The arm that serves `user_key` (a keyed user hash, kernel.hashing.user_key)."""
        edges: list[float] = []
        acc = 0.0
        for a in self.arms[:-1]:
            acc += a.share
            edges.append(acc)
        return self.arms[bisect.bisect_right(edges, self.bucket(user_key))]


def parse_experiment(data: object, *, source: str = "<experiment>", base_dir: Path | None = None) -> Experiment:
    """Validate a decoded experiment; relative weight paths resolve against `base_dir`."""
    try:
        exp = Experiment.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "experiment"
        raise ExperimentError(source, f"{loc}: {err['msg']}") from None
    if base_dir is None:
        return exp
    arms = []
    for a in exp.arms:
        w = a.variant.weights
        if w is not None and not w.is_absolute():
            a = a.model_copy(update={"variant": a.variant.model_copy(update={"weights": (base_dir / w).resolve()})})
        arms.append(a)
    return exp.model_copy(update={"arms": arms})


def load_experiment(path: Path | str, *, prompt_names: Collection[str] | None = None) -> Experiment:
    """Read, validate and check an experiment file: weights files exist, prompts are known (when given).

    Raises `ExperimentError` (malformed, invalid, missing weights) or `UnknownName` (a prompt)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ExperimentError(str(path), f"cannot read: {e.strerror or e}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ExperimentError(str(path), f"not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from None
    exp = parse_experiment(data, source=str(path), base_dir=path.parent)
    for a in exp.arms:
        w = a.variant.weights
        if w is not None and not w.is_file():
            raise ExperimentError(str(path), f"arms.{a.name}.variant.weights: no file {w}")
        if prompt_names is not None and a.variant.prompt is not None and a.variant.prompt not in prompt_names:
            raise UnknownName("prompt", a.variant.prompt, sorted(prompt_names))
    return exp


def experiment_from_settings(settings, *, prompt_names: Collection[str] | None = None) -> Experiment:
    """The experiment of `settings.experiment_path`, else the single default arm."""
    if settings.experiment_path is None:
        return Experiment.single()
    return load_experiment(settings.experiment_path, prompt_names=prompt_names)
