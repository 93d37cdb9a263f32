"""What a caller reads when something fails: the one error shape, with a message that names no file,
URL or internal detail for a runtime fault (the server log keeps the full text)."""
from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient

from kernel.errors import (
    CatalogError,
    ConfigError,
    DataFileError,
    LLMUnavailable,
    PromptError,
    RuntimeFault,
    UnknownName,
)
from server.app import create_app
from server.protocol import ErrorResponse

SECRET_PATH = "/srv/adselect/private/state.sqlite"
SECRET_URL = "http://10.1.2.3:8000/v1"

FAULTS = {
    "catalog": (CatalogError(f"cannot open {SECRET_PATH}: disk I/O error"), 503, "catalog_unavailable"),
    "llm": (LLMUnavailable("connection", f"ConnectError {SECRET_URL}"), 503, "llm_unavailable"),
    "runtime": (RuntimeFault(f"cap store {SECRET_PATH}: database is locked"), 500, "runtime_error"),
    "prompt": (PromptError(f"{SECRET_PATH}: not valid YAML"), 400, "prompt_invalid"),
    "config": (ConfigError("ADSELECT_WEIGHTS_PATH", f"no such file: {SECRET_PATH}"), 400, "config_invalid"),
    "unexpected": (KeyError(SECRET_PATH), 500, "internal_error"),
}


@pytest.fixture(scope="module")
def client(demo_settings, demo_services):
    app = create_app(demo_settings, services=demo_services)
    for name, (exc, _, _) in FAULTS.items():
        app.add_api_route(f"/boom/{name}", _raiser(exc))
    app.add_api_route("/boom/data", _raise_data_file_error)
    app.add_api_route("/boom/name", _raise_unknown_name)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def _raiser(exc: BaseException):
    async def boom():
        raise exc

    return boom


async def _raise_data_file_error():
    raise DataFileError(SECRET_PATH, 3, "malformed JSON (Expecting value at column 9)")


async def _raise_unknown_name():
    raise UnknownName("prompt", "rerank-typo", ["rerank"])


@pytest.mark.parametrize("name", list(FAULTS))
def test_faults_answer_without_internal_text(client, name, caplog):
    _, status, code = FAULTS[name]
    with caplog.at_level(logging.ERROR):
        res = client.get(f"/boom/{name}")
    assert res.status_code == status
    err = ErrorResponse.model_validate(res.json()).error
    assert err.code == code and err.message
    assert SECRET_PATH not in res.text and "10.1.2.3" not in res.text
    if status >= 500:  # the operator still has the full text
        assert any(SECRET_PATH in r.getMessage() or SECRET_PATH in str(r.exc_info) or SECRET_URL in r.getMessage() for r in caplog.records)


def test_user_errors_say_what_is_wrong_without_paths(client):
    res = client.get("/boom/data")
    err = ErrorResponse.model_validate(res.json()).error
    assert (res.status_code, err.code, err.message) == (400, "bad_data_file", "line 3: malformed JSON (Expecting value at column 9)")
    res = client.get("/boom/name")
    err = ErrorResponse.model_validate(res.json()).error
    assert res.status_code == 400 and "rerank-typo" in err.message and "Did you mean rerank" in err.message


def test_the_operator_message_keeps_the_detail():
    assert SECRET_PATH in str(DataFileError(SECRET_PATH, 3, "bad")) and SECRET_PATH in str(ConfigError("X", SECRET_PATH))
