"""Prompt templates as data: one YAML file per prompt under prompts/, placeholders checked at load.

A file holds `name, version, description, variables, system, user` and nothing else. `system` and
`user` are Jinja2 templates rendered with StrictUndefined; the placeholders they use must equal the
declared `variables`. Untrusted text goes through the `data` filter, which strips delimiter
look-alikes and wraps it in «…» so the model can be told that text in «» is data, never instructions.
"""
from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kernel.errors import MissingPromptVariable, PromptError, UnknownName

logger = logging.getLogger(__name__)

DATA_OPEN, DATA_CLOSE = "«", "»"
# Characters a payload could use to fake the end of its data block (guillemets and angle look-alikes).
_LOOKALIKES = "«»‹›《》〈〉⟨⟩⟪⟫❮❯❬❭＜＞"
_STRIP = str.maketrans({c: None for c in _LOOKALIKES})
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029\u200b-\u200f\u202a-\u202e\u2066-\u2069]")


def neutralise(text: object, limit: int | None = None) -> str:
    """Untrusted text on one line, without delimiter look-alikes or control characters, clipped to `limit`."""
    s = _CONTROL.sub(" ", str(text)).translate(_STRIP)
    s = " ".join(s.split())
    if limit is not None and len(s) > limit:
        s = s[: max(limit - 1, 0)].rstrip() + "…"
    return s


def datamark(text: object, limit: int | None = None) -> str:
    """Jinja filter `data`: the neutralised text wrapped in the data delimiters."""
    return f"{DATA_OPEN}{neutralise(text, limit)}{DATA_CLOSE}"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=False,
    )
    env.filters["data"] = datamark
    return env


_ENV = _environment()


class PromptFile(BaseModel):
    """The on-disk shape of a prompt file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    version: str = Field(min_length=1)
    description: str = ""
    variables: list[str]
    system: str = Field(min_length=1)
    user: str = Field(min_length=1)

    @field_validator("version", mode="before")
    @classmethod
    def _version_as_text(cls, v: Any) -> Any:
        return str(v) if isinstance(v, (int, float)) else v


@dataclass(frozen=True)
class PromptTemplate:
    """A validated prompt: render it into chat messages; carry name/version/sha256 into logs and reports."""

    name: str
    version: str
    description: str
    variables: tuple[str, ...]
    sha256: str
    path: Path | None
    _system: jinja2.Template
    _user: jinja2.Template

    @classmethod
    def from_file(cls, path: Path) -> PromptTemplate:
        path = Path(path)
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise PromptError(f"{path}: cannot read: {e}") from e
        return cls.from_bytes(raw, path=path)

    @classmethod
    def from_bytes(cls, raw: bytes, *, path: Path | None = None) -> PromptTemplate:
        where = str(path) if path is not None else "<prompt>"
        try:
            doc = yaml.safe_load(raw.decode("utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise PromptError(f"{where}: not valid YAML: {e}") from e
        if not isinstance(doc, dict):
            raise PromptError(f"{where}: expected a mapping at top level")
        try:
            spec = PromptFile.model_validate(doc)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or '<root>'}: {err['msg']}" for err in e.errors())
            raise PromptError(f"{where}: {problems}") from e
        if path is not None and path.stem != spec.name:
            raise PromptError(f"{where}: name {spec.name!r} differs from the file name {path.stem!r}")
        if len(set(spec.variables)) != len(spec.variables):
            raise PromptError(f"{where}: variables listed twice")
        try:
            used = set()
            for source in (spec.system, spec.user):
                used |= jinja2.meta.find_undeclared_variables(_ENV.parse(source))
            system, user = _ENV.from_string(spec.system), _ENV.from_string(spec.user)
        except jinja2.TemplateSyntaxError as e:
            raise PromptError(f"{where}: template syntax error line {e.lineno}: {e.message}") from e
        declared = set(spec.variables)
        if used != declared:
            parts = []
            if used - declared:
                parts.append(f"used but not declared: {sorted(used - declared)}")
            if declared - used:
                parts.append(f"declared but not used: {sorted(declared - used)}")
            raise PromptError(f"{where}: placeholders differ from `variables` ({'; '.join(parts)})")
        return cls(
            name=spec.name,
            version=spec.version,
            description=spec.description,
            variables=tuple(spec.variables),
            sha256=hashlib.sha256(raw).hexdigest(),
            path=path,
            _system=system,
            _user=user,
        )

    def info(self) -> dict[str, str]:
        """What goes into every log line and report: name, version, content hash."""
        return {"name": self.name, "version": self.version, "sha256": self.sha256}

    def render(self, **variables: Any) -> list[dict[str, str]]:
        """Chat messages [system, user]. Missing variables raise MissingPromptVariable; unknown ones PromptError."""
        missing = [v for v in self.variables if v not in variables]
        if missing:
            raise MissingPromptVariable(f"prompt {self.name!r} needs {missing}")
        extra = sorted(set(variables) - set(self.variables))
        if extra:
            raise PromptError(f"prompt {self.name!r} does not declare {extra}")
        try:
            system = self._system.render(**variables).strip()
            user = self._user.render(**variables).strip()
        except jinja2.UndefinedError as e:
            raise MissingPromptVariable(f"prompt {self.name!r}: {e.message}") from e
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]


class PromptRegistry:
    """Prompt templates by name: the `*.yaml` files of one directory, loaded on first use."""

    def __init__(self, directory: Path | str):
        self.directory = Path(directory)
        self._cache: dict[str, PromptTemplate] = {}

    def _paths(self) -> dict[str, Path]:
        if not self.directory.is_dir():
            return {}
        files = sorted([*self.directory.glob("*.yaml"), *self.directory.glob("*.yml")])
        return {p.stem: p for p in files}

    def names(self) -> list[str]:
        return sorted(self._paths())

    def get(self, name: str) -> PromptTemplate:
        if name in self._cache:
            return self._cache[name]
        paths = self._paths()
        if name not in paths:
            raise UnknownName("prompt", name, sorted(paths))
        template = PromptTemplate.from_file(paths[name])
        self._cache[name] = template
        logger.debug("prompt loaded", extra={"prompt": template.info()})
        return template

    def validate_all(self) -> list[PromptTemplate]:
        """Load every file; raise one PromptError naming every invalid file."""
        loaded, errors = [], []
        for name, path in self._paths().items():
            try:
                loaded.append(PromptTemplate.from_file(path))
            except PromptError as e:
                errors.append(str(e))
        if errors:
            raise PromptError("invalid prompt files:\n" + "\n".join(errors))
        return loaded
