"""The replay engine: runs one IdP scenario file (tests/idp/<idp>/*.json) against the live app.

The file format is documented in tests/idp/README.md; `load()` refuses a file
that does not follow it (an unknown key is a typo that would silently test
nothing), and `Replay.run()` fails with the step, the request and the answer.

Besides SCIM requests a scenario may save the admin's group mapping
(`save_mapping`) and run the pipeline to the end (`drain`: reconcile, the
purchases it plans, the invitations it queues), then read what the admin sees
(`"admin": "users" | "licenses" | "purchases" | "sync"` checks): the roles and
licenses each IdP's flow ends in.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select, text
from sqlalchemy.engine import Engine

from billing.gateway import LedgerGateway
from billing.purchasing import PurchaseRunner
from models.settings import TIERS, Settings
from models.tables import Invitation, Purchase, SyncEvent
from tests.workers.support import send_one
from workers.reconcile import Reconciler

ROOT = Path(__file__).parent
IDPS = ("entra", "entra_aadoptscim062020", "okta", "onelogin", "pingone", "google")
ERROR_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:Error"

# One CA bundle load for every client these tests open (httpx loads it per client otherwise).

_SCENARIO_KEYS = {"description", "sources", "covers", "provider", "steps"}
_STEP_KEYS = {"name", "request", "expect", "then", "repeat", "switch_provider", "save_mapping", "drain"}
# Steps that are not an IdP request: what the admin or the workers do between the IdP's requests.
_ACTION_STEPS = {"switch_provider": {"name"}, "save_mapping": {"name", "then"}, "drain": {"name", "then"}}
_REQUEST_KEYS = {"method", "path", "headers", "body", "api"}
_EXPECT_KEYS = {"status", "headers", "body_subset", "values", "absent", "length", "capture"}
_THEN_KEYS = {"name", "request", "expect", "db", "text"}
_DB_CHECKS = {"last_sync_event", "not_stored"}
_MAPPING_KEYS = {"user_groups", "admin_groups", "license_groups", "auto_invite", "seat_cap"}
_ADMIN_CHECKS = {"users", "licenses", "purchases", "sync"}
_USER_KEYS = {"role", "license", "status", "active", "status_reason", "invited", "invite_error"}
_USER_STATUSES = {"active", "no_access", "pending_license", "deleted"}
_SYNC_STATES = {"caught_up", "behind"}
_PURCHASE_KEYS = {"status", "quantities_before", "quantities_after"}
# A drain that has not settled after this many rounds never will (a worker would loop too).
DRAIN_ROUNDS = 20
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
    actions = [key for key in _ACTION_STEPS if key in step]
    if len(actions) > 1:
        raise FixtureError(f"{where}: one step is one of {sorted(_ACTION_STEPS)}, not {actions}")
    if actions:
        action = actions[0]
        extra = set(step) - _ACTION_STEPS[action] - {action}
        if extra:
            raise FixtureError(f"{where}: a {action} step has only {sorted(_ACTION_STEPS[action])}, not {sorted(extra)}")
        if action == "save_mapping":
            _check_mapping(step["save_mapping"], f"{where} save_mapping")
        if action == "drain" and step["drain"] is not True:
            raise FixtureError(f"{where}: write \"drain\": true")
    else:
        _keys(step, _STEP_KEYS, where, required={"name", "request", "expect"})
        _keys(step["request"], _REQUEST_KEYS, f"{where} request", required={"method", "path"})
        _keys(step["expect"], _EXPECT_KEYS, f"{where} expect", required={"status"})
    for index, check in enumerate(step.get("then", [])):
        _check_then(check, f"{where} then {index}")


def _check_then(check: Any, where: str) -> None:
    _keys(check, _THEN_KEYS | {"admin"}, where, required={"name"})
    if "admin" in check:
        _keys(check, {"name", "admin", "expect"}, where, required={"name", "admin", "expect"})
        _check_admin(check["admin"], check["expect"], where)
    elif "db" in check:
        if check["db"] not in _DB_CHECKS:
            raise FixtureError(f"{where}: 'db' is one of {sorted(_DB_CHECKS)}")
    else:
        _keys(check, _THEN_KEYS, where, required={"name", "request", "expect"})
        _keys(check["request"], _REQUEST_KEYS, f"{where} request", required={"method", "path"})
        if check["request"]["method"] != "GET":
            raise FixtureError(f"{where}: a 'then' check only reads (GET)")
        _keys(check.get("expect"), _EXPECT_KEYS, f"{where} expect", required={"status"})


def _check_mapping(mapping: Any, where: str) -> None:
    _keys(mapping, _MAPPING_KEYS, where)
    for slot in ("user_groups", "admin_groups"):
        if not isinstance(mapping.get(slot, []), list):
            raise FixtureError(f"{where}: '{slot}' is a list of group ids (captured variables)")
    license_groups = mapping.get("license_groups", {})
    _keys(license_groups, set(TIERS), f"{where} license_groups")
    if not all(isinstance(ids, list) for ids in license_groups.values()):
        raise FixtureError(f"{where}: each license tier holds a list of group ids")
    if not isinstance(mapping.get("auto_invite", False), bool):
        raise FixtureError(f"{where}: 'auto_invite' is true or false")
    if mapping.get("seat_cap") is not None:
        _keys(mapping["seat_cap"], set(TIERS), f"{where} seat_cap")


def _check_admin(kind: Any, expect: Any, where: str) -> None:
    """The admin checks state everything they look at: a half-written expectation is refused."""
    if kind not in _ADMIN_CHECKS:
        raise FixtureError(f"{where}: 'admin' is one of {sorted(_ADMIN_CHECKS)}")
    if kind == "users":
        if not isinstance(expect, dict) or not expect:
            raise FixtureError(f"{where}: expect every user of the tenant, by userName")
        for user_name, fields in expect.items():
            user_where = f"{where} user {user_name!r}"
            _keys(fields, _USER_KEYS, user_where, required={"role", "license", "status"})
            if fields["role"] not in ("user", "admin", None):
                raise FixtureError(f"{user_where}: role is \"user\", \"admin\" or null")
            if fields["license"] not in (*TIERS, None):
                raise FixtureError(f"{user_where}: license is a tier or null")
            if fields["status"] not in _USER_STATUSES:
                raise FixtureError(f"{user_where}: status is one of {sorted(_USER_STATUSES)}")
            if not isinstance(fields.get("invited", False), bool):
                raise FixtureError(f"{user_where}: 'invited' is true (invited_at set) or false")
            if not isinstance(fields.get("invite_error", False), (bool, str)):
                raise FixtureError(f"{user_where}: 'invite_error' is true/false (present or not) or the exact text")
    elif kind == "licenses":
        _keys(expect, set(TIERS), f"{where} expect", required=set(TIERS))
        for tier, seats in expect.items():
            _keys(seats, {"purchased", "assigned"}, f"{where} {tier}", required={"purchased", "assigned"})
    elif kind == "purchases":
        if not isinstance(expect, list):
            raise FixtureError(f"{where}: expect the tenant's purchases, oldest first")
        for index, purchase in enumerate(expect):
            _keys(purchase, _PURCHASE_KEYS, f"{where} purchase {index}", required={"status"})
    elif expect not in _SYNC_STATES:
        raise FixtureError(f"{where}: a sync check expects one of {sorted(_SYNC_STATES)}")


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

    def __init__(
        self, scenario: Scenario, admin: httpx.Client, engine: Engine, tenant: Any, settings: Settings | None = None
    ) -> None:
        self.scenario = scenario
        self.admin = admin
        self.engine = engine
        self.settings = settings or Settings()
        self.tenant_id = tenant.tenant_id
        self.scim = tenant.client
        self.vars: dict[str, Any] = {"tenant_id": tenant.tenant_id}
        self.requests = 0
        self.outbox = _Outbox()

    def run(self) -> None:
        for step in self.scenario.steps:
            if "switch_provider" in step:
                self._switch_provider(step["switch_provider"])
            elif "save_mapping" in step:
                self._save_mapping(step["name"], step["save_mapping"])
            elif "drain" in step:
                self._drain(step["name"])
            else:
                for n in range(1, step.get("repeat", 1) + 1):
                    self.vars["n"] = n
                    self._step(step)
                continue
            for check in step.get("then", []):
                self._then(f"{step['name']} / then {check['name']!r}", check)

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
        if "admin" in check:
            self._admin_check(name, check["admin"], self.sub(check["expect"]))
        elif kind == "last_sync_event":
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

    def _save_mapping(self, name: str, mapping: dict[str, Any]) -> None:
        """The admin saves which groups give access, admin rights and each tier (PUT …/scim/config)."""
        body = self.sub(mapping)
        response = self.admin.put(f"/tenants/{self.tenant_id}/scim/config", json=body)
        self.requests += 1
        if response.status_code != 200:
            self._fail(name, f"saving the mapping: status {response.status_code}", response.request, response)
        want = _normal_mapping(body)
        got = _normal_mapping(response.json())
        if got != want:
            self._fail(name, f"the saved mapping reads back as {got}, expected {want}", response.request, response)

    def _drain(self, name: str) -> None:
        """Run the pipeline for this tenant until nothing is left, as a calm worker would:
        reconcile, every purchase it plans (no Stripe here: settled as not_billed), every
        invitation it queues (accepted by an in-memory mail server)."""
        reconciler = Reconciler(self.engine, LedgerGateway())
        runner = PurchaseRunner(self.engine, LedgerGateway())
        tenant = self.tenant_id
        unapplied = select(SyncEvent.id).where(SyncEvent.tenant_id == tenant, SyncEvent.applied_at.is_(None))
        purchases = select(Purchase.id).where(Purchase.tenant_id == tenant, Purchase.status == "pending")
        invitations = select(Invitation.id).where(
            Invitation.tenant_id == tenant, Invitation.status.in_(("pending", "sending"))
        )
        for _ in range(DRAIN_ROUNDS):
            if reconciler.run(tenant).busy:
                self._fail(name, "the tenant's lock is held: something else reconciles it")
            for purchase_id in self._ids(purchases):
                runner.run(purchase_id)
            for invitation_id in self._ids(invitations):
                send_one(self.engine, self.outbox, self.settings, invitation_id)
            if not (self._ids(unapplied) or self._ids(purchases) or self._ids(invitations)):
                return
        self._fail(name, f"the pipeline did not settle in {DRAIN_ROUNDS} rounds")

    def _ids(self, query: Any) -> list[str]:
        with self.engine.connect() as connection:
            return [value for (value,) in connection.execute(query)]

    def _admin_get(self, name: str, what: str) -> Any:
        response = self.admin.get(f"/tenants/{self.tenant_id}/{what}")
        self.requests += 1
        if response.status_code != 200:
            self._fail(name, f"GET …/{what}: status {response.status_code}", response.request, response)
        return response.json()

    def _admin_check(self, name: str, kind: str, expect: Any) -> None:
        """What the admin reads after the pipeline: users' access, seats, purchases, sync state."""
        got = self._admin_get(name, kind)
        if kind == "users":
            self._check_users(name, expect, got)
        elif kind == "licenses":
            if got != expect:
                self._fail(name, f"licenses {_short(got)}, expected {_short(expect)}")
        elif kind == "purchases":
            problems = [] if len(got) == len(expect) else [f"{len(got)} purchases, expected {len(expect)}"]
            for index, (want, purchase) in enumerate(zip(expect, got, strict=False)):
                problems += subset(want, purchase, f"[{index}]")
            if problems:
                self._fail(name, "; ".join(problems) + f" (purchases: {_short(got, 1500)})")
        else:
            caught_up = (
                got["events_total"] > 0
                and got["events_applied"] == got["events_total"]
                and got["pending_purchases"] == 0
                and got["pending_invitations"] == 0
                and got["last_reconciled_at"] is not None
            )
            behind = got["events_applied"] < got["events_total"]
            if (expect == "caught_up" and not caught_up) or (expect == "behind" and not behind):
                self._fail(name, f"sync {got}: expected {expect}")

    def _check_users(self, name: str, expect: dict[str, dict[str, Any]], rows: list[dict[str, Any]]) -> None:
        by_name: dict[str, dict[str, Any]] = {}
        for row in rows:
            if row["userName"] in by_name:
                self._fail(name, f"two users named {row['userName']!r}: the check cannot tell them apart")
            by_name[row["userName"]] = row
        problems: list[str] = []
        unlisted = sorted(set(by_name) - set(expect))
        if unlisted:
            # The check states every user: a user who gained access by mistake is seen.
            problems.append(f"users the check does not list: {unlisted}")
        for user_name, want in expect.items():
            row = by_name.get(user_name)
            if row is None:
                problems.append(f"{user_name}: not in the admin's list")
                continue
            got = {key: row[key] for key in ("role", "license", "status", "active", "status_reason")}
            got["invited"] = row["invited_at"] is not None
            # invite_error: true/false for present or not, or the exact text.
            error = row["invite_error"]
            got["invite_error"] = (error is not None) if isinstance(want.get("invite_error"), bool) else error
            for key, value in want.items():
                if got[key] != value or isinstance(got[key], bool) != isinstance(value, bool):
                    problems.append(f"{user_name}.{key}: {_short(got[key])}, expected {_short(value)}")
        if problems:
            keys = ("role", "license", "status", "invited_at", "invite_error")
            shown = {r["userName"]: {k: r[k] for k in keys} for r in rows}
            self._fail(name, "; ".join(problems) + f"\n  users: {_short(shown, 3000)}")

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


class _Outbox:
    """The mail server of a drain: accepts every invitation, keeps it in memory."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send(self, mail: Any) -> None:
        self.sent.append(mail)


def _normal_mapping(config: dict[str, Any]) -> dict[str, Any]:
    """A mapping as sets of group ids, every tier present, defaults filled in."""
    license_groups = config.get("license_groups") or {}
    return {
        "user_groups": set(config.get("user_groups") or ()),
        "admin_groups": set(config.get("admin_groups") or ()),
        "license_groups": {tier: set(license_groups.get(tier) or ()) for tier in TIERS},
        "auto_invite": config.get("auto_invite", False),
        "seat_cap": config.get("seat_cap") or None,
    }


def _json(response: httpx.Response) -> Any:
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        return _MISSING
