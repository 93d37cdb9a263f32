"""`adselect` command line: ingest, serve, select, prompts, eval. Thin: parses options, calls the core.

Conventions (Click's): exit 0 on success, 2 when the command line or its input is wrong (a malformed
file, an unknown name, an invalid option value), 1 when something failed while running (a dependency
down, an unexpected error); every error message goes to stderr, results to stdout. Logs are JSON lines on
stderr (`--log-format text` for people), configured here, at the entry point, never at import time.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any, NoReturn, Optional

import typer
from pydantic import ValidationError
from typer.core import TyperGroup

from eval.cli import RAY_HELP, ray_flag_default
from eval.cli import app as eval_app
from kernel.errors import RUNTIME_EXIT, USAGE_EXIT, AdSelectError, exit_code
from kernel.settings import Settings


class _ReportingGroup(TyperGroup):
    """Every command runs inside this: a typed error is one line on stderr and its exit code; anything
    unexpected is exit 1 with its type (the traceback with --verbose), never a bare traceback."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, ray_flag_default(args))  # `--ray` alone: a local Ray

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except AdSelectError as e:
            _fail(e)
        except Exception as e:
            if _STATE["verbose"]:
                traceback.print_exc(file=sys.stderr)
            typer.echo(f"error: internal error ({type(e).__name__}): {e}", err=True)
            raise typer.Exit(code=RUNTIME_EXIT) from None


_STATE = {"verbose": False}
app = typer.Typer(add_completion=False, no_args_is_help=True, help="LLM-augmented ad selection.", cls=_ReportingGroup)


def _load_settings() -> Settings:
    """Settings from the environment and .env; an invalid value is a usage error (exit 2)."""
    try:
        return Settings()
    except ValidationError as e:
        first = e.errors()[0]
        name = "_".join(str(x) for x in first["loc"]).upper()
        _usage(f"ADSELECT_{name}: {first['msg']}")


def _settings(data_dir: Optional[Path]) -> Settings:
    s = _load_settings()
    if data_dir is not None:
        s = s.model_copy(update={"data_dir": data_dir})
    return s


def _fail(e: Exception) -> NoReturn:
    """One line on stderr; exit 2 for input the user can fix, 1 for a runtime failure."""
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(code=exit_code(e))


def _usage(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=USAGE_EXIT)


DATA_DIR_HELP = "State directory (Chroma, behaviour tables, caps); overrides ADSELECT_DATA_DIR."


@app.callback()
def main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging, and tracebacks for unexpected errors."),
    log_format: str = typer.Option("json", "--log-format", help="Log lines on stderr: json (one object per line, with every extra field) or text."),
) -> None:
    """LLM-augmented ad selection."""
    from server.logs import configure_logging

    if log_format not in ("json", "text"):
        raise typer.BadParameter("json or text", param_hint="--log-format")
    _STATE["verbose"] = verbose
    _STATE["log_format"] = log_format
    configure_logging(level=logging.DEBUG if verbose else logging.INFO, fmt=log_format)  # type: ignore[arg-type]


@app.command()
def ingest(
    ads: Path = typer.Option(..., "--ads", help="Ad catalog, canonical JSONL."),
    history: list[Path] = typer.Option([], "--history", help="Logged impressions (canonical JSONL); only their histories are used."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
    force: bool = typer.Option(False, "--force", help="Re-embed even when the catalog is unchanged."),
    ray: Optional[str] = typer.Option(
        None, "--ray",
        help=RAY_HELP + " The embedding batches run on actors, and so does the counting of --history (partial counts merged here; the same tables).",
    ),  # fmt: skip
    understand: Optional[bool] = typer.Option(
        None, "--understand/--no-understand",
        help="Run ad understanding (LLM at ADSELECT_LLM_URL, else the bundled model) and store it with each ad; default ADSELECT_UNDERSTAND_AT_INGEST.",
    ),  # fmt: skip
) -> None:
    """Load a catalog into Chroma (upsert by ad_id) and learn co-visitation/popularity from histories."""
    import contextlib

    from selection.services import behaviour_dir, embedder_key_for, make_embedder, make_store, sequence_config
    from retrieval.ingest import ingest_catalog, learn_behaviour, learn_sequence

    s = _settings(data_dir)
    try:
        store = make_store(s)
        embedder = lambda: make_embedder(s)  # noqa: E731 - a factory: the model loads only when work is due
        embedders: list = []  # --ray: the embedding actors, stopped once the catalog is written (before counting)
        with contextlib.ExitStack() as stack:
            count = None  # behaviour counted in this process; with --ray, on actors (the same counts)
            if ray is not None:
                from eval.distributed import ray_session
                from eval.distributed.behaviour import RayBehaviourCounter
                from eval.distributed.embed import RayEmbedder

                stack.enter_context(ray_session(ray))

                def ray_embedder() -> RayEmbedder:
                    made = RayEmbedder(s, workers=s.ray_workers)
                    embedders.append(made)
                    return made

                embedder = ray_embedder
                count = RayBehaviourCounter(workers=s.ray_workers)
            enrich, reports = None, []
            if s.understand_at_ingest if understand is None else understand:
                from agent.understanding import understanding_at_ingest

                enrich = understanding_at_ingest(s, stack, reports=reports)
            try:
                rep = ingest_catalog(
                    ads_path=ads, store=store, embedder=embedder, show_progress=True, force=force, enrich=enrich, embedder_key=embedder_key_for(s),
                    embed_processes=s.embed_processes,
                )
            finally:
                for e in embedders:
                    e.close()
            for r in reports:
                typer.echo(f"understanding: {json.dumps(r.as_dict())}")
            typer.echo(f"{rep.summary()} (collection {s.collection!r})")
            index = store.load_index() if history else None
            if index is not None:
                stats = learn_behaviour(
                    history_paths=history, catalog_ids=index.ids, out_dir=behaviour_dir(s),
                    window=s.covisit_window, decay=s.recency_decay, cf_dims=s.cf_dims, count=count,
                )  # fmt: skip
                where = f" (counted on {s.ray_workers} Ray actors)" if ray is not None else ""
                typer.echo(f"behaviour: {stats.n_histories} histories, {stats.forward.nnz} co-visit pairs{where} -> {behaviour_dir(s)}")
        if index is not None and s.sequence_enabled:  # not on Ray (one process, ADSELECT_SEQUENCE_THREADS)
            model = learn_sequence(
                history_paths=history, index=index, behaviour_dir=behaviour_dir(s), config=sequence_config(s),
                show_progress=True, threads=s.sequence_threads,
            )
            how = "reused" if model.meta.get("reused") else f"trained in {model.meta.get('train', {}).get('seconds')}s"
            typer.echo(f"sequence model: {how} -> {behaviour_dir(s)}")
    except AdSelectError as e:
        _fail(e)


@app.command()
def build(
    out: Optional[Path] = typer.Option(None, "--out", help="Artifact root; default ADSELECT_ARTIFACT_DIR, else DATA_DIR/artifacts."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
) -> None:
    """Package the serving state learned by ingest and eval tune (behaviour tables, fusion weights and calibration,
    the sequence model) as one content-hashed artifact under OUT/<version>/ (OUT/LATEST names it); replicas load it
    read-only with ADSELECT_ARTIFACT_DIR. Prints the version and the directory."""
    from selection.artifact import build_artifact
    from selection.services import load_serving_state, make_store

    s = _settings(data_dir)
    root = out or s.artifact_dir or s.data_dir / "artifacts"
    try:
        index = make_store(s).load_index()
        state = load_serving_state(s.model_copy(update={"artifact_dir": None}), index)  # the data dir's files
        path = build_artifact(
            root, index=index, fusion=state.fusion, behaviour=state.behaviour, sequence=state.sequence, collection=s.collection
        )
    except AdSelectError as e:
        _fail(e)
    typer.echo(f"artifact {path.name} -> {path}")


@app.command()
def select(
    user_id: str = typer.Option("cli-user", "--user-id", help="The caller's user id (stored and logged only as a keyed hash)."),
    history: str = typer.Option("", "--history", help="Comma-separated ad ids, oldest first."),
    event: list[str] = typer.Option([], "--event", help="Free-text event (repeatable)."),
    candidates: Optional[str] = typer.Option(None, "--candidates", help="Comma-separated logged candidate ids; omitted: retrieve from the catalog."),
    k: int = typer.Option(3, "--k", help="How many ads to return."),
    use_llm: bool = typer.Option(False, "--llm/--no-llm", help="Call the LLM at ADSELECT_LLM_URL."),
    deadline_ms: int = typer.Option(5000, "--deadline-ms", help="Total time budget in ms (capped by ADSELECT_MAX_DEADLINE_MS)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
) -> None:
    """Select ads for one impression; prints the decision as the JSON POST /v1/select answers."""
    from selection.services import build_services
    from server.convert import to_core, to_wire
    from server.protocol import SelectRequestBody

    s = _settings(data_dir)
    try:
        body = SelectRequestBody(
            user_id=user_id,
            history=[h for h in history.split(",") if h],
            events=list(event),
            candidates=[c for c in candidates.split(",") if c] if candidates is not None else None,
            k=k,
            deadline_ms=deadline_ms,
            use_llm=use_llm,
        )
    except ValidationError as e:  # the endpoint's limits, as the endpoint's 422 words them
        first = e.errors()[0]
        _usage(f"{'.'.join(str(x) for x in first['loc']) or 'input'}: {first['msg']}")
    try:
        services = build_services(s, llm_url=s.llm_url if use_llm else None)
        decision = asyncio.run(services.selector.aselect(to_core(body, s)))
    except AdSelectError as e:
        _fail(e)
    sys.stdout.write(to_wire(decision).model_dump_json(by_alias=True, indent=2) + "\n")


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on."),
    port: int = typer.Option(8000, "--port", help="TCP port to listen on."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
    no_llm: bool = typer.Option(False, "--no-llm", help="Fast path only: do not start or call an LLM."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Worker processes; default ADSELECT_WORKERS, 0 there: one per CPU."),
) -> None:
    """Serve POST /v1/select. Without ADSELECT_LLM_URL the bundled local model is started and stopped with it."""
    import uvicorn

    s = _settings(data_dir)
    if no_llm:
        s = s.model_copy(update={"llm_enabled": False})
    s.resolved_weights_path()  # a configured weights file that is not there stops here, before the port opens
    n = workers or s.workers or os.cpu_count() or 1
    if n == 1:
        from server.app import create_app
        from server.logs import queue_logging

        if s.log_queue_size:
            queue_logging(size=s.log_queue_size)

        # log_config=None: uvicorn's own records (access log included) go to the JSON handler set up in main()
        # SIGHUP reloads weights, behaviour tables, experiment and prompts (as POST /admin/reload does)
        uvicorn.run(create_app(s, reload_on_sighup=True), host=host, port=port, log_level="info", log_config=None)
        return
    from server.multiworker import worker_environment

    with worker_environment(s, workers=n, log_format=_STATE.get("log_format", "json")):
        uvicorn.run(
            "adselect.app:factory", factory=True, workers=n, host=host, port=port, log_level="info", log_config=None,
            timeout_worker_healthcheck=int(s.worker_start_timeout_s),
        )  # fmt: skip


@app.command("settings")
def settings_table(markdown: bool = typer.Option(True, "--markdown/--values", help="Markdown table of every setting, or current values.")) -> None:
    """Every setting with its env variable, default and meaning (the README's table is this output)."""
    s = _load_settings()
    if not markdown:
        for name in Settings.model_fields:
            v = getattr(s, name)
            typer.echo(f"ADSELECT_{name.upper()}={'***' if ('secret' in name or 'key' in name) and v else v}")
        return
    typer.echo("| env | default | meaning |\n|---|---|---|")
    for name, f in Settings.model_fields.items():
        default = f.get_default(call_default_factory=True)
        if name == "prompts_dir":
            default = "prompts/ (in the repo)"
        typer.echo(f"| `ADSELECT_{name.upper()}` | `{default}` | {(f.description or '').replace('|', '/')} |")


prompts_app = typer.Typer(no_args_is_help=True, help="List, show, render and validate prompt templates.")
app.add_typer(prompts_app, name="prompts")


def _registry():
    from agent.prompts import PromptRegistry

    return PromptRegistry(_load_settings().prompts_dir)


@prompts_app.command("list")
def prompts_list() -> None:
    """Every template: name, version, sha256 prefix, description."""
    reg = _registry()
    for name in reg.names():
        t = reg.get(name)
        typer.echo(f"{t.name}\tv{t.version}\t{t.sha256[:12]}\t{t.description}")


@prompts_app.command("show")
def prompts_show(name: str = typer.Argument(..., help="Template name (file name under prompts/ without .yaml).")) -> None:
    """Print a template's file, with its version, sha256 and declared variables."""
    try:
        t = _registry().get(name)
    except AdSelectError as e:
        _fail(e)
    typer.echo(f"# {t.name} v{t.version} sha256 {t.sha256}\n# variables: {', '.join(t.variables)}")
    typer.echo(t.path.read_text() if t.path else "")


@prompts_app.command("render")
def prompts_render(
    name: str = typer.Argument(..., help="Template name (file name under prompts/ without .yaml)."),
    vars_file: Optional[Path] = typer.Option(None, "--vars", help="JSON object of variables; default: a sample from the demo catalog."),
) -> None:
    """Print the chat messages the template renders to."""
    try:
        t = _registry().get(name)
        if vars_file is not None:
            variables = json.loads(vars_file.read_text())
            messages = t.render(**variables)
        else:
            from agent.reranker import LLMReranker
            from kernel.types import Candidate
            from retrieval.records import read_ads

            ads = read_ads(Path(__file__).resolve().parent.parent / "data" / "demo" / "ads.jsonl")
            call = LLMReranker(_NoLLM(), t).prepare(
                history_ads=ads[:3], events=["searched: gift ideas"],
                candidates=[Candidate(ad=a, priors={}) for a in ads[10:15]], rewrite=True,
            )
            messages = call.messages
    except AdSelectError as e:
        _fail(e)
    except (OSError, json.JSONDecodeError) as e:  # the --vars file given
        _usage(f"--vars {vars_file}: {e}")
    for m in messages:
        typer.echo(f"--- {m['role']} ---\n{m['content']}")


class _NoLLM:
    """Rendering needs no model; any call is a bug."""

    model = "none"

    async def acomplete(self, *a, **k):  # pragma: no cover
        raise RuntimeError("render does not call the LLM")


@prompts_app.command("validate")
def prompts_validate() -> None:
    """Load every template; exit 2 naming every invalid file (on stderr)."""
    try:
        loaded = _registry().validate_all()
    except AdSelectError as e:
        _fail(e)
    typer.echo(f"{len(loaded)} prompt(s) valid: {', '.join(t.name for t in loaded)}")


app.add_typer(eval_app, name="eval")  # eval/cli.py: run, validate, tasks, tune


if __name__ == "__main__":
    app()
