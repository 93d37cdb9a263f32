"""Property-based API tests from the app's own OpenAPI schema (schemathesis 4): at least 1,000 generated
requests over every operation, valid and invalid, with keys on; no response is a 5xx and every response
matches the documented status codes, content types and schemas. The LLM stage is a fast fake."""
from __future__ import annotations

import collections

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance, status_code_conformance

from server.app import create_app
from tests.security.conftest import API_KEY, reranker_for, services_with, settings_with
from tests.security.fakes import FakeFunctionLLM

POSITIVE_EXAMPLES = 700
NEGATIVE_EXAMPLES = 400
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def test_generated_requests_never_get_a_server_error(demo_settings, demo_services):
    svc = services_with(demo_services, reranker=reranker_for(FakeFunctionLLM(), demo_settings), llm_concurrency=64)
    app = create_app(settings_with(demo_settings, api_keys=[API_KEY], max_body_bytes=16384), services=svc)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers={"X-API-Key": API_KEY})
    key = {"X-API-Key": API_KEY}
    statuses: collections.Counter[tuple[str, int]] = collections.Counter()

    def run(mode: schemathesis.GenerationMode, examples: int) -> None:
        @settings(
            max_examples=examples, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )  # fmt: skip
        @given(case=schema.as_strategy(mode, headers=key))
        def one(case: schemathesis.Case) -> None:
            response = case.call(headers=key)
            statuses[(f"{case.method} {case.path}", response.status_code)] += 1
            case.validate_response(response, checks=CHECKS, headers=key)

        one()

    run(schemathesis.GenerationMode.POSITIVE, POSITIVE_EXAMPLES)
    run(schemathesis.GenerationMode.NEGATIVE, NEGATIVE_EXAMPLES)
    print("\nschemathesis:", sum(statuses.values()), "requests;", dict(sorted(statuses.items())))
    assert sum(statuses.values()) >= 1000
    assert not [k for k in statuses if k[1] >= 500]
    assert statuses[("POST /v1/select", 200)] >= 100  # most valid requests reached the pipeline
