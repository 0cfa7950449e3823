"""GET /api/openapi.json, and a schemathesis run of it against a live server.

The run checks that every answer's status, content type, headers and body are the documented
ones and that no 5xx comes back other than the documented 502/503/504. The server is a real
aiohttp server on a free port with real agents; schemathesis (synchronous, requests) runs in a
thread so the server's loop keeps serving.
"""

import asyncio

import hypothesis
import pytest
import schemathesis
from tests.apihelpers import ADMIN, ALICE, TENANTS, start
from schemathesis.core.failures import FailureGroup
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from corral.web import paths
from corral.web.app import create_app
from corral.web.openapi import SPEC

ALLOWED_5XX = {502, 503, 504}
# An endless stream has no end for a generated case to wait for; tests/test_stream.py and
# tests/test_admin.py cover them.
ENDLESS = {f"GET {paths.STREAM}", f"GET {paths.ADMIN_EVENTS}"}
EXAMPLES = {GenerationMode.POSITIVE: 40, GenerationMode.NEGATIVE: 15}


def no_undocumented_server_error(ctx, response, case) -> None:
    """A 5xx is a failure unless it is one of the documented 502/503/504."""
    if response.status_code >= 500 and response.status_code not in ALLOWED_5XX:
        raise AssertionError(f"{case.operation.label} answered {response.status_code}: {response.text[:300]}")


CHECKS = [
    no_undocumented_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def test_spec_describes_every_path_with_the_shared_error_schema():
    """Every path web/paths.py names is in the document, and every error answer is the shared one."""
    named = {value for name, value in vars(paths).items() if name.isupper() and isinstance(value, str)}
    assert {path for _, path in documented_routes()} == named
    error = SPEC["components"]["schemas"]["Error"]
    assert error["required"] == ["error"] and error["properties"]["error"]["required"] == ["code", "message"]
    for path, item in SPEC["paths"].items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            for status, response in operation["responses"].items():
                if int(status) >= 400:
                    assert response == {"$ref": f"#/components/responses/E{status}"}, (method, path, status)


def served_routes(app) -> set[tuple[str, str]]:
    """(method, path) of every route the app serves; the HEAD aiohttp adds beside a GET goes with it."""
    routes = {(r.method.lower(), r.resource.canonical) for r in app.router.routes()}
    return {(method, path) for method, path in routes if method != "head" or ("get", path) not in routes}


def documented_routes() -> set[tuple[str, str]]:
    """(method, path) of every operation in the document."""
    return {(method, path) for path, item in SPEC["paths"].items() for method in item if method != "parameters"}


def test_the_document_and_the_router_agree(make_config):
    """Every route and method the app serves is documented, and every documented one is served."""
    app = create_app(make_config())
    served, documented = served_routes(app), documented_routes()
    assert not served - documented, f"served, not in the OpenAPI document: {sorted(served - documented)}"
    assert not documented - served, f"in the OpenAPI document, not served: {sorted(documented - served)}"


async def test_openapi_is_served(aiohttp_client, make_config):
    """The document is served as JSON without credentials."""
    client = await aiohttp_client(create_app(make_config()))
    response = await client.get("/api/openapi.json")
    assert response.status == 200
    assert (await response.json()) == SPEC


CREDENTIALS = {"tenantKey": ALICE, "adminToken": ADMIN, "metricsToken": ADMIN}  # the admin token opens /metrics too


def credentials(operation) -> dict:
    """The Authorization header the operation's security scheme asks for (none for open routes)."""
    security = operation.definition.raw.get("security", SPEC["security"])
    for requirement in security:
        for scheme in requirement:
            return CREDENTIALS[scheme]
    return {}


def run_schemathesis(base_url: str) -> tuple[list[str], dict[str, set[int]]]:
    """Fuzz every operation with a bounded number of examples; return the failures and the statuses seen."""
    schema = schemathesis.openapi.from_url(f"{base_url}/api/openapi.json")
    failures, statuses = [], {}
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.label in ENDLESS:
            continue
        seen = statuses[operation.label] = set()
        for mode, examples in EXAMPLES.items():
            failures += _fuzz(operation, mode, examples, base_url, seen)
    return failures, statuses


def _fuzz(operation, mode, examples: int, base_url: str, seen: set[int]) -> list[str]:
    """Run one operation's cases in one generation mode; the first failure of each is kept."""
    failures = []

    def record_status(ctx, response, case) -> None:
        """Remember the status (so the test knows the credentials worked)."""
        seen.add(response.status_code)

    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis.settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    def check(case):
        """Send one case and validate the answer."""
        try:
            case.call_and_validate(base_url=base_url, headers=credentials(operation), checks=[record_status, *CHECKS],
                                  timeout=30)
        except (Exception, FailureGroup) as exc:  # collect, so one run reports every operation's problem
            if not failures:
                failures.append(f"{operation.label} [{mode}] {case.as_curl_command()}\n{exc}")

    try:
        check()
    except hypothesis.errors.Unsatisfiable:
        pass  # negative mode of an operation with no inputs: nothing to make invalid
    return failures


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_schemathesis_finds_nothing_undocumented(aiohttp_client, make_config, tmp_path):
    """No undocumented status, content type or body; no 5xx but 502/503/504 (with tenants and admin)."""
    client = await start(aiohttp_client, make_config, tmp_path, tenants=TENANTS,
                         request_timeout=2.0, max_sessions=30, idle_timeout=5.0)
    base_url = str(client.make_url("")).rstrip("/")
    failures, statuses = await asyncio.to_thread(run_schemathesis, base_url)
    assert not failures, "\n\n".join(failures)
    assert all(seen - {401} for seen in statuses.values()), statuses  # the fuzz got past authentication
    assert 200 in statuses["POST /api/chat"] and 200 in statuses["GET /admin/stats"], statuses
