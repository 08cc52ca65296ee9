"""The replay engine: runs one IdP scenario file (tests/idp/<idp>/*.json) against the live app.

The file format is documented in tests/idp/README.md; `load()` refuses a file
that does not follow it (an unknown key is a typo that would silently test
nothing), and `Replay.run()` fails with the step, the request and the answer.
"""

from __future__ import annotations

import json
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.engine import Engine

ROOT = Path(__file__).parent
IDPS = ("entra", "entra_aadoptscim062020", "okta", "onelogin", "pingone", "google")
ERROR_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:Error"

# One CA bundle load for every client these tests open (httpx loads it per client otherwise).
SSL_CONTEXT = ssl.create_default_context()

_SCENARIO_KEYS = {"description", "sources", "covers", "provider", "steps"}
_STEP_KEYS = {"name", "request", "expect", "then", "repeat", "switch_provider"}
_REQUEST_KEYS = {"method", "path", "headers", "body", "api"}
_EXPECT_KEYS = {"status", "headers", "body_subset", "values", "absent", "length", "capture"}
_THEN_KEYS = {"name", "request", "expect", "db", "text"}
_DB_CHECKS = {"last_sync_event", "not_stored"}
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_MISSING = object()


class FixtureError(Exception):
    """A scenario file that does not follow tests/idp/README.md."""


@dataclass(frozen=True)
class Scenario:
    path: Path
    idp: str
    provider: str
    description: str
    sources: list[str]
    covers: list[str]
    steps: list[dict[str, Any]]

    @property
    def id(self) -> str:
        return f"{self.idp}/{self.path.stem}"


def scenario_files() -> list[Path]:
    return sorted(p for idp in IDPS for p in (ROOT / idp).glob("*.json"))


def load(path: Path) -> Scenario:
    """Read and check one scenario file."""
    data = json.loads(path.read_text(encoding="utf-8"))
    where = f"{path.parent.name}/{path.name}"
    _keys(data, _SCENARIO_KEYS, where, required={"description", "sources", "covers", "steps"})
    if not data["sources"] or not all(isinstance(s, str) for s in data["sources"]):
        raise FixtureError(f"{where}: 'sources' must name the vendor documents the requests come from")
    if not isinstance(data["steps"], list) or not data["steps"]:
        raise FixtureError(f"{where}: 'steps' must be a non-empty list")
    for index, step in enumerate(data["steps"]):
        _check_step(step, f"{where} step {index}")
    idp = path.parent.name
    # entra_aadoptscim062020 is Entra with a flag on its Tenant URL.
    provider = data.get("provider") or idp.split("_")[0]
    return Scenario(path, idp, provider, data["description"], data["sources"], data["covers"], data["steps"])


def _keys(obj: Any, allowed: set[str], where: str, required: set[str] = frozenset()) -> None:
    if not isinstance(obj, dict):
        raise FixtureError(f"{where}: must be an object")
    unknown = set(obj) - allowed
    if unknown:
        raise FixtureError(f"{where}: unknown keys {sorted(unknown)} (allowed: {sorted(allowed)})")
    missing = required - set(obj)
    if missing:
        raise FixtureError(f"{where}: missing keys {sorted(missing)}")


def _check_step(step: Any, where: str) -> None:
    _keys(step, _STEP_KEYS, where, required={"name"})
    if "switch_provider" in step:
        if set(step) - {"name", "switch_provider"}:
            raise FixtureError(f"{where}: a switch_provider step has only a name")
        return
    _keys(step, _STEP_KEYS, where, required={"name", "request", "expect"})
    _keys(step["request"], _REQUEST_KEYS, f"{where} request", required={"method", "path"})
    _keys(step["expect"], _EXPECT_KEYS, f"{where} expect", required={"status"})
    for index, check in enumerate(step.get("then", [])):
        check_where = f"{where} then {index}"
        _keys(check, _THEN_KEYS, check_where, required={"name"})
        if "db" in check:
            if check["db"] not in _DB_CHECKS:
                raise FixtureError(f"{check_where}: 'db' is one of {sorted(_DB_CHECKS)}")
        else:
            _keys(check["request"], _REQUEST_KEYS, f"{check_where} request", required={"method", "path"})
            if check["request"]["method"] != "GET":
                raise FixtureError(f"{check_where}: a 'then' check only reads (GET)")
            _keys(check.get("expect"), _EXPECT_KEYS, f"{check_where} expect", required={"status"})


# --------------------------------------------------------------- JSON paths


def parse_path(path: str) -> list[str | int]:
    """`Resources[0].name.givenName`, `["urn:…:User"].manager.value` → keys and indexes."""
    out: list[str | int] = []
    i = 0
    while i < len(path):
        char = path[i]
        if char == ".":
            i += 1
        elif char == "[":
            if path[i + 1:i + 2] == '"':
                key, end = json.JSONDecoder().raw_decode(path, i + 1)
                out.append(key)
                i = end
            else:
                end = path.index("]", i)
                out.append(int(path[i + 1:end]))
                i = end
            if path[i:i + 1] != "]":
                raise FixtureError(f"bad JSON path {path!r}")
            i += 1
        else:
            end = i
            while end < len(path) and path[end] not in ".[":
                end += 1
            if ":" in path[i:end]:
                # "urn:…:2.0:User" would split at its dots and match nothing, silently.
                raise FixtureError(f"quote URN keys in JSON paths: [\"urn:…\"], not {path!r}")
            out.append(path[i:end])
            i = end
    return out


def resolve(doc: Any, path: str) -> Any:
    """The value at `path`, or _MISSING. Keys match exactly: we check what we emit."""
    value = doc
    for key in parse_path(path):
        if isinstance(key, int):
            if not isinstance(value, list) or not -len(value) <= key < len(value):
                return _MISSING
            value = value[key]
        else:
            if not isinstance(value, dict) or key not in value:
                return _MISSING
            value = value[key]
    return value


def subset(expected: Any, actual: Any, where: str = "$") -> list[str]:
    """Mismatches of `expected` as a recursive subset of `actual`.

    Objects: every expected key is there and matches. Lists: every expected
    element matches a distinct actual element, in any order. Scalars: equal and
    of the same JSON type (true is not "True", 1 is not true).
    """
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{where}: expected an object, got {_short(actual)}"]
        problems: list[str] = []
        for key, value in expected.items():
            if key not in actual:
                problems.append(f"{where}.{key}: missing")
            else:
                problems.extend(subset(value, actual[key], f"{where}.{key}"))
        return problems
    if isinstance(expected, list):
        if not isinstance(actual, list):
            return [f"{where}: expected a list, got {_short(actual)}"]
        if _assign(expected, actual, 0, set()):
            return []
        unmatched = [item for item in expected if all(subset(item, candidate) for candidate in actual)]
        if unmatched:
            return [f"{where}: nothing matches {_short(item)}" for item in unmatched]
        return [f"{where}: the elements of {_short(expected)} do not match distinct elements"]
    if isinstance(expected, bool) != isinstance(actual, bool) or expected != actual or (
        isinstance(expected, str) != isinstance(actual, str)
    ):
        return [f"{where}: expected {_short(expected)}, got {_short(actual)}"]
    return []


def _assign(expected: list[Any], actual: list[Any], index: int, used: set[int]) -> bool:
    if index == len(expected):
        return True
    for position, item in enumerate(actual):
        if position not in used and not subset(expected[index], item):
            if _assign(expected, actual, index + 1, used | {position}):
                return True
    return False


def _short(value: Any, limit: int = 300) -> str:
    shown = json.dumps(value, ensure_ascii=False) if value is not _MISSING else "<absent>"
    return shown if len(shown) <= limit else shown[:limit] + "…"


# -------------------------------------------------------------- the runner


class Replay:
    """Runs a scenario's steps in order against one tenant, keeping captured variables."""

    def __init__(self, scenario: Scenario, admin: httpx.Client, engine: Engine, tenant: Any) -> None:
        self.scenario = scenario
        self.admin = admin
        self.engine = engine
        self.tenant_id = tenant.tenant_id
        self.scim = tenant.client
        self.vars: dict[str, Any] = {"tenant_id": tenant.tenant_id}
        self.requests = 0

    def run(self) -> None:
        for step in self.scenario.steps:
            if "switch_provider" in step:
                self._switch_provider(step["switch_provider"])
                continue
            for n in range(1, step.get("repeat", 1) + 1):
                self.vars["n"] = n
                self._step(step)

    def _fail(
        self, step: str, message: str, request: httpx.Request | None = None, response: httpx.Response | None = None
    ) -> None:
        lines = [f"{self.scenario.id} — step {step!r}: {message}"]
        if request is not None:
            lines.append(f"  request: {request.method} {request.url}")
            if request.content:
                lines.append(f"  body: {request.content.decode(errors='replace')[:800]}")
        if response is not None:
            lines.append(f"  answer: {response.status_code} {response.text[:1500]}")
        raise AssertionError("\n".join(lines))

    def _step(self, step: dict[str, Any]) -> None:
        name = step["name"]
        request, response = self.send(step["request"])
        self.check(name, step["expect"], request, response)
        for check in step.get("then", []):
            self._then(f"{name} / then {check['name']!r}", check)

    def _then(self, name: str, check: dict[str, Any]) -> None:
        kind = check.get("db")
        if kind == "last_sync_event":
            self._last_sync_event(name, self.sub(check["expect"]))
        elif kind == "not_stored":
            self._not_stored(name, self.sub(check["text"]))
        else:
            request, response = self.send(check["request"])
            self.check(name, check["expect"], request, response)

    # ------------------------------------------------------------ HTTP

    def send(self, spec: dict[str, Any]) -> tuple[httpx.Request, httpx.Response]:
        client = self.admin if spec.get("api") == "admin" else self.scim
        headers = self.sub(spec.get("headers") or {})
        body = self.sub(spec["body"]) if "body" in spec else None
        request = client.build_request(
            spec["method"],
            self.sub(spec["path"]),
            headers={k: v for k, v in headers.items() if v is not None},
            content=None if body is None else json.dumps(body, ensure_ascii=False).encode(),
        )
        for name, value in headers.items():
            # A null header is one the IdP does not send (Entra: no User-Agent).
            if value is None and name in request.headers:
                del request.headers[name]
        response = client.send(request)
        self.requests += 1
        return request, response

    def check(self, step: str, expect: dict[str, Any], request: httpx.Request, response: httpx.Response) -> None:
        if response.status_code >= 500:
            self._fail(step, "the server answered 5xx to an IdP's request", request, response)
        captures = expect.get("capture", {})
        expect = self.sub({k: v for k, v in expect.items() if k != "capture"})
        if response.status_code != expect["status"]:
            self._fail(step, f"status {response.status_code}, expected {expect['status']}", request, response)
        body = _json(response)
        is_scim = "/scim/v2/" in str(request.url)
        if is_scim and response.status_code >= 400:
            # RFC 7644 §3.12: every SCIM error answer has the error schema, status as a string.
            is_error = isinstance(body, dict) and body.get("schemas") == [ERROR_SCHEMA]
            if not (is_error and body.get("status") == str(response.status_code)):
                self._fail(step, "not a SCIM error body", request, response)
        if is_scim and response.content:
            if not response.headers.get("content-type", "").startswith("application/scim+json"):
                self._fail(step, f"content-type {response.headers.get('content-type')!r}", request, response)
        for header, value in expect.get("headers", {}).items():
            got = response.headers.get(header)
            wrong = (value is True and got is None) or (value is False and got is not None)
            if wrong or (isinstance(value, str) and got != value):
                self._fail(step, f"header {header}: {got!r}, expected {value!r}", request, response)
        problems: list[str] = []
        if "body_subset" in expect:
            problems += subset(expect["body_subset"], body)
        for path, value in expect.get("values", {}).items():
            problems += subset(value, resolve(body, path), path)
        for path in expect.get("absent", []):
            if resolve(body, path) is not _MISSING:
                problems.append(f"{path}: present ({_short(resolve(body, path))}), expected absent")
        for path, length in expect.get("length", {}).items():
            found = resolve(body, path)
            if not isinstance(found, list) or len(found) != length:
                problems.append(f"{path}: expected {length} elements, got {_short(found)}")
        if problems:
            self._fail(step, "; ".join(problems), request, response)
        for var, where in captures.items():
            if where.lower().startswith("header:"):
                value = response.headers.get(where.split(":", 1)[1])
            else:
                value = resolve(body, where)
            if value is None or value is _MISSING:
                self._fail(step, f"nothing to capture as {var!r} at {where!r}", request, response)
            self.vars[var] = value

    # ------------------------------------------------------------ state

    def _switch_provider(self, provider: str) -> None:
        """The admin moves the tenant to another IdP: disconnect, reconnect, new token; the directory stays."""
        disconnected = self.admin.delete(f"/tenants/{self.tenant_id}/scim")
        assert disconnected.status_code == 204, disconnected.text
        connected = self.admin.post(f"/tenants/{self.tenant_id}/scim", json={"provider": provider})
        assert connected.status_code == 201, connected.text
        self.scim.headers["Authorization"] = f"Bearer {connected.json()['token']}"

    def _last_sync_event(self, name: str, expected: dict[str, Any]) -> None:
        with self.engine.connect() as connection:
            row = connection.execute(
                text("SELECT kind, user_ids FROM sync_event WHERE tenant_id = :t ORDER BY id DESC LIMIT 1"),
                {"t": self.tenant_id},
            ).one_or_none()
        if row is None:
            self._fail(name, "no sync event was recorded")
        kind, user_ids = row
        if isinstance(user_ids, str):
            user_ids = json.loads(user_ids)
        got = {"kind": kind, "user_ids": None if user_ids is None else sorted(user_ids)}
        want = dict(expected)
        if want.get("user_ids") is not None:
            want["user_ids"] = sorted(want["user_ids"])
        problems = subset(want, got)
        if problems:
            self._fail(name, f"last sync event {got}: " + "; ".join(problems))

    def _not_stored(self, name: str, secret: str) -> None:
        """The text is in no directory row of the tenant, in any column (a password sent by the IdP)."""
        with self.engine.connect() as connection:
            for table in ("scim_user", "scim_group", "sync_event"):
                rows = connection.execute(text(f"SELECT * FROM {table} WHERE tenant_id = :t"), {"t": self.tenant_id})
                for row in rows:
                    if any(secret in (v if isinstance(v, str) else json.dumps(v, default=str)) for v in row):
                        self._fail(name, f"{secret!r} is stored in {table}")

    # ------------------------------------------------------- placeholders

    def sub(self, value: Any) -> Any:
        """Replace {var} with captured values, recursively; a string that is one placeholder takes the value's type."""
        if isinstance(value, str):
            whole = _PLACEHOLDER.fullmatch(value)
            if whole:
                return self._var(whole.group(1))
            return _PLACEHOLDER.sub(lambda m: str(self._var(m.group(1))), value)
        if isinstance(value, list):
            return [self.sub(item) for item in value]
        if isinstance(value, dict):
            return {self.sub(key): self.sub(item) for key, item in value.items()}
        return value

    def _var(self, name: str) -> Any:
        if name not in self.vars:
            raise FixtureError(f"{self.scenario.id}: {{{name}}} was not captured by an earlier step")
        return self.vars[name]


def _json(response: httpx.Response) -> Any:
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        return _MISSING
