"""Domain exceptions. Two roots: UserError (the caller can fix it) and RuntimeFault (ours or a dependency's).

server/errors.py maps these types — never their message text — to one JSON error shape.
"""
from __future__ import annotations


class AdSelectError(Exception):
    code = "internal_error"


class UserError(AdSelectError):
    """Bad input the caller can correct."""

    code = "bad_request"


class RuntimeFault(AdSelectError):
    """A dependency or internal state failed."""

    code = "runtime_error"


class DataFileError(UserError):
    """A malformed or invalid line in an input file; names the file and line."""

    code = "bad_data_file"

    def __init__(self, path: str, line: int | None, reason: str):
        self.path, self.line, self.reason = str(path), line, reason
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {reason}")


class CatalogError(RuntimeFault):
    """The ad catalog is missing, empty or unreadable."""

    code = "catalog_unavailable"


class PromptError(UserError):
    code = "prompt_invalid"


class MissingPromptVariable(PromptError):
    code = "prompt_missing_variable"


class UnknownName(UserError):
    """A registry lookup failed; carries close matches."""

    code = "unknown_name"

    def __init__(self, kind: str, name: str, known: list[str]):
        import difflib

        self.kind, self.name, self.known = kind, name, known
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else f" Known: {', '.join(sorted(known))}."
        super().__init__(f"unknown {kind} {name!r}.{hint}")


class LLMUnavailable(RuntimeFault):
    """The LLM did not answer in time, refused the connection, or returned an HTTP error."""

    code = "llm_unavailable"

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason  # short machine-readable: timeout | connection | http_error | breaker_open | busy
        super().__init__(f"{reason}: {detail}" if detail else reason)


class LLMOutputInvalid(RuntimeFault):
    """The LLM answered but its output failed parsing or validation."""

    code = "llm_output_invalid"

    def __init__(self, reason: str, raw: str | None = None, detail: str = ""):
        self.reason = reason  # short machine-readable: malformed_json | schema_mismatch | empty_ranking | truncated
        self.raw = raw
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class LocalLLMStartError(RuntimeFault):
    """The bundled local LLM server could not be started (missing model file, port taken, process died, not ready in time)."""

    code = "local_llm_start_failed"


class SequenceModelMismatch(CatalogError):
    """A saved sequence model was trained for other catalog rows (the catalog changed since)."""

    code = "sequence_model_mismatch"

    def __init__(self, path: str, *, expected: str, found: str):
        self.path, self.expected, self.found = path, expected, found
        super().__init__(f"{path}: sequence model built for catalog ids {found[:12]}, catalog is {expected[:12]}")
