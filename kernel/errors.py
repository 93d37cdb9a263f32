"""Domain exceptions. Two roots: UserError (the caller can fix it) and RuntimeFault (ours or a dependency's).

server/errors.py maps these types — never their message text — to one JSON error shape. What a remote
caller reads is `public_message`: for a runtime fault a fixed sentence per type (the exception's text may
hold file paths, URLs or a dependency's own message, which stay in the server log); for a user error what
is wrong with the input, without paths. `str(exc)` is for the operator (CLI stderr, logs).
"""
from __future__ import annotations


class AdSelectError(Exception):
    code = "internal_error"
    public = "internal error"

    @property
    def public_message(self) -> str:
        """What a remote caller may be told (no paths, no internal detail)."""
        return self.public


class UserError(AdSelectError):
    """Bad input the caller can correct."""

    code = "bad_request"

    @property
    def public_message(self) -> str:
        return str(self)


class RuntimeFault(AdSelectError):
    """A dependency or internal state failed."""

    code = "runtime_error"
    public = "a dependency of the service failed"


class ConfigError(UserError):
    """A setting names something that is not there (e.g. ADSELECT_WEIGHTS_PATH pointing at no file).

    Raised at start-up, before any request is served: a typo never silently falls back to a default."""

    code = "config_invalid"

    def __init__(self, setting: str, problem: str):
        self.setting, self.problem = setting, problem
        super().__init__(f"{setting}: {problem}")

    @property
    def public_message(self) -> str:
        return f"server setting {self.setting} is invalid"


class DataFileError(UserError):
    """A malformed or invalid line in an input file; names the file and line."""

    code = "bad_data_file"

    def __init__(self, path: str, line: int | None, reason: str):
        self.path, self.line, self.reason = str(path), line, reason
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {reason}")

    @property
    def public_message(self) -> str:
        return f"line {self.line}: {self.reason}" if self.line is not None else self.reason


class CatalogError(RuntimeFault):
    """The ad catalog is missing, empty or unreadable."""

    code = "catalog_unavailable"
    public = "the ad catalog is unavailable"


class PromptError(UserError):
    """A prompt template is invalid or was rendered with the wrong variables (the text names the file)."""

    code = "prompt_invalid"

    @property
    def public_message(self) -> str:
        return "the prompt template is invalid"


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
    public = "the LLM is unavailable"

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason  # short machine-readable: timeout | connection | http_error | breaker_open | busy
        super().__init__(f"{reason}: {detail}" if detail else reason)


class LLMOutputInvalid(RuntimeFault):
    """The LLM answered but its output failed parsing or validation."""

    code = "llm_output_invalid"
    public = "the LLM's output was invalid"

    def __init__(self, reason: str, raw: str | None = None, detail: str = ""):
        self.reason = reason  # short machine-readable: malformed_json | schema_mismatch | empty_ranking | truncated
        self.raw = raw
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class LocalLLMStartError(RuntimeFault):
    """The bundled local LLM server could not be started (missing model file, port taken, process died, not ready in time)."""

    code = "local_llm_start_failed"
    public = "the local LLM could not be started"


# --- the closed loop: feedback events and experiment files ---------------------------------------------


class UnknownRequest(UserError):
    """A feedback event names a request id this service did not serve (or no longer remembers)."""

    code = "unknown_request_id"

    def __init__(self, request_id: str):
        self.request_id = request_id
        super().__init__(f"unknown request_id {request_id!r}")


class AdNotServed(UserError):
    """A feedback event names an ad that its request did not serve."""

    code = "ad_not_served"

    def __init__(self, request_id: str, ad_id: str):
        self.request_id, self.ad_id = request_id, ad_id
        super().__init__(f"request {request_id!r} did not serve ad {ad_id!r}")


class EventIdConflict(UserError):
    """An event id was seen before with a different payload (a retry must repeat the same event)."""

    code = "event_id_conflict"

    def __init__(self, event_id: str):
        self.event_id = event_id
        super().__init__(f"event_id {event_id!r} was already recorded with a different payload")


class ExperimentError(UserError):
    """An experiment file is malformed or invalid; names the file."""

    code = "experiment_invalid"

    def __init__(self, path: str, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")

    @property
    def public_message(self) -> str:
        return f"experiment file invalid: {self.reason}"


class ReloadRefused(UserError):
    """A hot reload found a bad file (weights, behaviour tables, experiment, prompts): nothing was swapped,
    the previous version keeps serving."""

    code = "reload_refused"

    def __init__(self, component: str, reason: str):
        self.component, self.reason = component, reason
        super().__init__(f"reload refused, {component}: {reason}")

    @property
    def public_message(self) -> str:
        return f"reload refused: the {self.component} file is invalid; the previous version keeps serving"


USAGE_EXIT = 2  # Click's convention: the command line or its input is wrong
RUNTIME_EXIT = 1  # the command was right and something failed while running it


def exit_code(exc: BaseException) -> int:
    """A command's exit status for an error: 2 for input the user can fix, 1 for a runtime failure."""
    return USAGE_EXIT if isinstance(exc, UserError) else RUNTIME_EXIT




class SequenceModelMismatch(CatalogError):
    """A saved sequence model was trained for other catalog rows (the catalog changed since)."""

    code = "sequence_model_mismatch"

    def __init__(self, path: str, *, expected: str, found: str):
        self.path, self.expected, self.found = path, expected, found
        super().__init__(f"{path}: sequence model built for catalog ids {found[:12]}, catalog is {expected[:12]}")


class EmbedderMismatch(CatalogError):
    """The stored catalog's vectors came from another embedder (backend or model) than the one configured:
    queries and catalog would live in different vector spaces. Re-ingest (`adselect ingest`, which re-embeds
    on a new key) or set ADSELECT_EMBED_BACKEND back to the stored one."""

    code = "embedder_mismatch"

    def __init__(self, collection: str, *, stored: str, configured: str):
        self.collection, self.stored, self.configured = collection, stored, configured
        super().__init__(
            f"collection {collection!r} was embedded by {stored}, the configured embedder is {configured}: "
            "run `adselect ingest` (it re-embeds the catalog) or set ADSELECT_EMBED_BACKEND to the stored backend"
        )


# --- serving artifacts (selection/artifact.py) -----------------------------------------------------------


class ArtifactError(RuntimeFault):
    """The serving artifact (ADSELECT_ARTIFACT_DIR) cannot be used; the replica refuses to start on it."""

    code = "artifact_invalid"
    public = "the serving artifact is invalid"


class ArtifactTampered(ArtifactError):
    """A file of the artifact is missing, extra, or its sha256 differs from the manifest."""

    code = "artifact_tampered"

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"artifact {path}: {reason}; rebuild it with `adselect build`")


class ArtifactCatalogMismatch(ArtifactError):
    """The artifact was built for another catalog (other ads, other content or another row order)."""

    code = "artifact_catalog_mismatch"

    def __init__(self, path: str, *, version: str, built_for: str, built_ads: int | None, catalog: str, catalog_ads: int):
        self.path, self.version = path, version
        self.built_for, self.catalog = built_for, catalog
        super().__init__(
            f"artifact {version} at {path} was built for catalog {built_for[:12]} ({built_ads} ads); this replica's "
            f"catalog is {catalog[:12]} ({catalog_ads} ads): rebuild it with `adselect build` against this catalog"
        )
