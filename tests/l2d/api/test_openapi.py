"""The OpenAPI 3.1 contract (l2d/api/openapi.py): a valid document (the official 3.1 meta-schema, every schema a valid
JSON Schema 2020-12, every reference and path parameter resolved), served as built, in step with the route table both
ways, and kept by a real daemon: schemathesis (pinned in pyproject.toml) sends a bounded, seeded set of generated
requests, valid and invalid, to every operation of a real `l2d` process; no answer may be a 5xx or differ from the
document (status, content type, headers, body schema), invalid input must be refused with a 4xx and the admin
routes must refuse a request without the token. `assert_conforms` holds the other API tests' answers, records and
errors alike, to the same document."""
from __future__ import annotations

import functools
import json
import re
import time
import urllib.request
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import jsonschema_rs
import pytest
import schemathesis
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import (allow_header_conformance, content_type_conformance, ignored_auth,
                                               negative_data_rejection, response_headers_conformance,
                                               response_schema_conformance, status_code_conformance,
                                               unsupported_method)
from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR

from l2d.api.openapi import MEMBER_ROUTES_NOTE, OPENAPI_PATH, spec
from l2d.core.coin_tx import Transfer
from l2d.core.params import LOCAL
from l2d.core.tx import sign
from l2d.federation.transport import routes as transport_routes
from tests.conftest import L2dProcess, Keys, write_node_toml

TOKEN = "openapi-test-admin-token-0123456789abcdef"
METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")
EXAMPLES = 100  # fuzzing examples per operation (positive and negative); the coverage phase adds its own cases


def walk(node: Any) -> Iterator[Any]:
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from walk(child)


def schemas_of(doc: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """Every schema object of the document, with where it is."""
    for name, s in doc["components"]["schemas"].items():
        yield f"components/{name}", s
    for route, item in doc["paths"].items():
        for method, o in item.items():
            where = f"{method.upper()} {route}"
            for p in o.get("parameters", []):
                yield f"{where} parameter {p['name']}", p["schema"]
            for media, c in o.get("requestBody", {}).get("content", {}).items():
                yield f"{where} body {media}", c["schema"]
            for status, r in o["responses"].items():
                for media, c in r.get("content", {}).items():
                    yield f"{where} {status} {media}", c["schema"]
                for h, hd in r.get("headers", {}).items():
                    yield f"{where} {status} header {h}", hd["schema"]


def _template(route: str) -> re.Pattern[str]:
    return re.compile(re.sub(r"\\{\w+\\}", "[^/]+", re.escape(route)))


@functools.cache
def _body_validator(method: str, route: str, status: str, media: str) -> Any:
    doc = spec()
    schema = doc["paths"][route][method]["responses"][status]["content"][media]["schema"]
    return jsonschema_rs.validator_for({"allOf": [schema], "components": doc["components"]})


@functools.cache
def _error_validator() -> Any:
    return jsonschema_rs.validator_for(spec()["components"]["schemas"]["Error"])


def assert_conforms(method: str, path: str, status: int, content_type: str, body: Any) -> None:
    """A response of the REST API is one the document describes: the status its operation declares, a declared
    content type and, for JSON, a body its schema accepts. The API tests call it on what they read (test_ledger's
    get_json and expect_error, test_fl's get and post), so records of every kind are checked, not only empty lists."""
    doc = spec()
    path = path.split("?", 1)[0]
    matched = [r for r in doc["paths"] if _template(r).fullmatch(path)]
    routes = [r for r in matched if method.lower() in doc["paths"][r]]
    if not routes:  # outside the document: no such path (404), or not this method (405), with the Error body
        assert status == (405 if matched else 404), f"{method} {path}: {status}"
        assert not list(_error_validator().iter_errors(body)), body
        return
    route = min(routes, key=lambda r: r.count("{"))  # a literal segment wins, as in the route table
    responses = doc["paths"][route][method.lower()]["responses"]
    assert str(status) in responses, f"{method} {route}: status {status} is not documented"
    content = responses[str(status)].get("content", {})
    assert content_type in content, f"{method} {route} {status}: {content_type} is not documented"
    if content_type == "application/json":
        errors = [f"{e.instance_path}: {e.message}" for e in
                  _body_validator(method.lower(), route, str(status), content_type).iter_errors(body)]
        assert not errors, f"{method} {path} {status}: the body breaks the document: {errors[:5]}"


# -- the document ----------------------------------------------------------------------------------------------
def test_the_document_is_valid_openapi_3_1() -> None:
    doc = spec()
    assert doc["openapi"] == "3.1.0"
    OPENAPI_31_VALIDATOR.validate(doc)  # the official 3.1 meta-schema (as schemathesis bundles it)
    for where, s in schemas_of(doc):  # the 3.1 meta-schema leaves schema objects to their dialect: 2020-12
        assert jsonschema_rs.meta.is_valid(s), f"{where}: not a valid JSON Schema 2020-12 schema: {s}"
    for r in (n["$ref"] for n in walk(doc) if isinstance(n, dict) and "$ref" in n):
        assert r.startswith("#/components/schemas/") and r.rsplit("/", 1)[1] in doc["components"]["schemas"], r
    ids = [o["operationId"] for item in doc["paths"].values() for o in item.values()]
    assert len(ids) == len(set(ids))


def test_every_operation_declares_its_path_parameters_and_json_errors() -> None:
    for route, item in spec()["paths"].items():
        for method, o in item.items():
            where = f"{method.upper()} {route}"
            in_path = {p["name"] for p in o.get("parameters", []) if p["in"] == "path"}
            assert in_path == set(re.findall(r"{(\w+)}", route)), where
            assert any(s.startswith("2") for s in o["responses"]), where
            for status, r in o["responses"].items():
                if status >= "400":  # every error is the one JSON body of l2d/api/http.py
                    schema = r["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"} or \
                        {"$ref": "#/components/schemas/Error"} in schema["allOf"], (where, status)
            if "security" in o:
                assert "401" in o["responses"] and "WWW-Authenticate" in o["responses"]["401"]["headers"], where
            if method != "get":  # every write is rate-limited (l2d/api/limits.py)
                assert "Retry-After" in o["responses"]["429"]["headers"], where


def test_a_body_that_breaks_the_documented_rules_is_refused_by_the_schema() -> None:
    """The schemas say something: a 63-character id, a negative amount, a missing field all fail them."""
    doc = spec()

    def body_schema(route: str, method: str) -> Any:
        s = doc["paths"][route][method]["requestBody"]["content"]["application/json"]["schema"]
        return jsonschema_rs.validator_for(s)

    mint = body_schema("/api/admin/mint", "post")
    assert mint.is_valid({"recipient": "ab" * 32, "amount_sat": 5})
    assert not mint.is_valid({"recipient": "ab" * 31 + "a", "amount_sat": 5})
    assert not mint.is_valid({"recipient": "ab" * 32, "amount_sat": 0})
    assert not mint.is_valid({"recipient": "ab" * 32})
    tx = body_schema("/api/l2/tx", "post")
    assert tx.is_valid({"tx": "00ff"}) and not tx.is_valid({"tx": "0"}) and not tx.is_valid({"tx": "zz"})


@pytest.fixture
async def served(client: TestClient) -> Any:
    resp = await client.get(OPENAPI_PATH)
    assert resp.status == 200 and resp.content_type == "application/json"
    return await resp.json()


async def test_the_daemon_serves_the_document(served: Any) -> None:
    assert served == json.loads(json.dumps(spec()))


def app_routes(client: TestClient) -> set[tuple[str, str]]:
    """(method, path template) of every route of the node's app; HEAD only where aiohttp adds it beside a GET."""
    assert client.app is not None
    out = {(r.method.lower(), r.resource.canonical) for r in client.app.router.routes() if r.resource is not None}
    return {(m, p) for m, p in out if not (m == "head" and ("get", p) in out)}


async def test_the_route_table_and_the_document_agree_both_ways(client: TestClient) -> None:
    documented = {(m, p) for p, item in spec()["paths"].items() for m in item if m in METHODS}
    served = app_routes(client)
    assert served - documented == set(), "routes without an operation in l2d/api/openapi.py"
    assert documented - served == set(), "operations in l2d/api/openapi.py without a route"
    # The member transport's routes (mounted by Node.web_app when the federation has other members) are left out on
    # purpose, each named in the document's note of why (MEMBER_ROUTES_NOTE).
    handler = SimpleNamespace(handle_ws=None, handle_blocks=None, handle_txs=None)
    member = {(r.method.lower(), r.path) for r in transport_routes(handler)}  # type: ignore[arg-type]
    assert len(member) == 3 and not member & documented
    for method, p in member:
        assert f"{method.upper()} {p}" in MEMBER_ROUTES_NOTE


# -- schemathesis against a real daemon ------------------------------------------------------------------------
def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def _wait_for(cond: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)
    return value


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[L2dProcess]:
    """A real l2d with every subsystem's routes live (bridge, anchoring and orchestration on, no bitcoind), a
    mint and a transfer committed and a snapshot written, so the 200 answers carry records."""
    tmp = tmp_path_factory.mktemp("openapi")
    conf = write_node_toml(
        tmp / "node.toml", {Keys.pubkey(1): 10**8}, TOKEN, block={"interval_ms": 50},
        bridge={"enabled": True, "threshold": 2, "signer_key_files": [str(tmp / f"signer{i}.key") for i in range(3)]},
        anchoring={"enabled": True}, orchestration={"enabled": True},
        api={"rate_limit_per_s": 1_000_000, "rate_limit_burst": 1_000_000})  # the limiter runs, never refuses
    d = L2dProcess(conf, tmp / "node.log")
    try:
        d.post("/api/admin/mint", {"recipient": Keys.pubkey(2).hex(), "amount_sat": 5000}, TOKEN)
        tx = sign(LOCAL, Keys.secret(1), 0, 1, Transfer(Keys.pubkey(3), 700), bytes(32))
        d.post("/api/l2/tx", {"tx": tx.raw.hex()}, TOKEN)
        _wait_for(lambda: _get(d.url(f"/api/l2/tx/{tx.txid.hex()}"))["status"] == "committed", "the transfer")
        d.post("/api/admin/snapshot", {}, TOKEN)
        yield d
    finally:
        try:
            code = d.stop()  # SIGTERM: after all that, a clean shutdown
        except BaseException:
            d.kill()
            raise
    errors = [rec for rec in d.lines() if rec["level"] in ("error", "critical")]
    assert code == 0 and not errors, (code, errors[:3])


# a copy: schemathesis may write into the document it loads
SCHEMA = schemathesis.openapi.from_dict(json.loads(json.dumps(spec())), config=schemathesis.Config.from_dict({
    "seed": 11,
    "headers": {"Authorization": f"Bearer {TOKEN}"},  # the admin routes run; ignored_auth drops it to check them
    "max-stream-events": 1,  # the dashboard's feed never ends: read its first event
    "request-timeout": 30,
    "generation": {"mode": "all", "deterministic": True, "database": "none"},
    # invalid input is refused with a 4xx: schemathesis's list, with 413 (a body past api.max_body_bytes)
    "checks": {"negative_data_rejection": {"expected-statuses": [400, 401, 403, 404, 405, 406, 409, 413, 415, 422,
                                                                 428, 429]}},
    "phases": {"examples": {"enabled": True}, "coverage": {"enabled": True}, "fuzzing": {"enabled": True},
               "stateful": {"enabled": False}},
}))
CHECKS = [schemathesis.checks.not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance, negative_data_rejection, ignored_auth,
          unsupported_method, allow_header_conformance]


@SCHEMA.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_a_real_daemon_keeps_the_contract(case: schemathesis.Case, daemon: L2dProcess) -> None:
    case.call_and_validate(base_url=daemon.url(""), checks=CHECKS)
