"""The one place exceptions become HTTP: type -> status, one JSON shape {"error": {code, message, details}}.

The message a caller reads is the error's `public_message` (kernel/errors.py), never `str(exc)`: a runtime
fault's text may name a file, a URL or a dependency's internals; it goes to the server log instead."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kernel.errors import AdSelectError, CatalogError, EventIdConflict, LLMUnavailable, RuntimeFault, UnknownRequest, UserError

log = logging.getLogger(__name__)


def status_for(exc: Exception) -> int:
    match exc:
        case UnknownRequest():
            return 404
        case EventIdConflict():
            return 409
        case UserError():
            return 400
        case CatalogError() | LLMUnavailable():
            return 503
        case RuntimeFault():
            return 500
        case _:
            return 500


def error_response(status: int, code: str, message: str, details=None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"code": code, "message": message, "details": details}}, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errs = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        first = errs[0] if errs else {"loc": [], "msg": "invalid request"}
        msg = f"{'.'.join(str(x) for x in first['loc'][1:]) or 'body'}: {first['msg']}"
        return error_response(422, "validation_error", msg, errs)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, f"http_{exc.status_code}", str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(AdSelectError)
    async def _domain(_: Request, exc: AdSelectError) -> JSONResponse:
        status = status_for(exc)
        if status >= 500:
            log.error("request failed: %s", exc, extra={"error_code": exc.code, "error_type": type(exc).__name__})
        return error_response(status, exc.code, exc.public_message)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "internal_error", "internal error")
