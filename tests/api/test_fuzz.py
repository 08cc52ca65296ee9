"""The fuzz suite (issue 8): generated hostile requests against the SCIM surface and the admin API.

Every request must be answered below 500, and a request that is refused (or only reads) must
change nothing: after each one, the rows of every tenant (users, groups, members, accounts,
mappings, events, seats, purchases, invitations, the tenant row but its last_request_at) are
counted and hashed, per tenant and table, and compared with the state before it.

The app runs in process (Starlette's TestClient on create_app) with the real database and
Redis of the test session. Hypothesis draws the requests with a fixed seed (derandomize), so
every run sends the same ones; each test prints how many requests it sent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import random
import re
import time
from collections import Counter
from typing import Any, Iterator
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine import Connection, Engine

from api.app import Services, create_app
from tests.conftest import ADMIN_TOKEN, wipe

USER = "urn:ietf:params:scim:schemas:core:2.0:User"
GROUP = "urn:ietf:params:scim:schemas:core:2.0:Group"
ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
PATCH_OP = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
SEARCH = "urn:ietf:params:scim:api:messages:2.0:SearchRequest"
BULK = "urn:ietf:params:scim:api:messages:2.0:BulkRequest"

# Requests per test; together well over the 5,000 issue 8 asks for.
# FUZZ_SCALE shortens a local run (0.1 = a tenth); `make test` runs them all.
_SCALE = float(os.environ.get("FUZZ_SCALE", "1"))
SCIM_EXAMPLES = int(1400 * _SCALE)
QUERY_EXAMPLES = int(1200 * _SCALE)
WRITE_EXAMPLES = int(1200 * _SCALE)
AUTH_EXAMPLES = int(600 * _SCALE)
ADMIN_EXAMPLES = int(700 * _SCALE)
# The directory is rebuilt from the seed after this many requests, so that the
# per-request fingerprint stays cheap and deleted seeds come back.
RESET_EVERY = 250

TENANT_TABLES = (
    "scim_user", "scim_group", "group_member", "account", "group_mapping",
    "sync_event", "seat_count", "purchase", "invitation",
)
SENT: Counter[str] = Counter()
TIMES: Counter[str] = Counter()
STATUSES: Counter[int] = Counter()


# ---------------------------------------------------------------- the world under test


@dataclasses.dataclass
class World:
    """The app, its seeded tenants, and the fingerprint of the data before the next request."""

    client: InProcess
    engine: Engine
    reader: Connection
    refs: dict[str, str] = dataclasses.field(default_factory=dict)
    before: dict[tuple[str, str], tuple[int, str]] = dataclasses.field(default_factory=dict)
    since_reset: int = RESET_EVERY

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        response = self.client.request(
            method, f"/admin/api{path}", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            content=None if body is None else json.dumps(body),
        )
        assert response.status_code < 300, response.text
        return response.json() if response.content else None

    def scim(self, tenant: str, method: str, path: str, body: Any) -> Any:
        response = self.client.request(
            method, f"/scim/v2/{self.refs[tenant]}{path}", content=json.dumps(body),
            headers={"Authorization": f"Bearer {self.refs[tenant + '.token']}",
                     "Content-Type": "application/scim+json"},
        )
        assert response.status_code < 300, response.text
        return response.json() if response.content else None

    def reset(self) -> None:
        """Empty tables, then tenants A and B (connected, each with users, groups and a mapping)
        and C (disconnected: its old token must fail)."""
        wipe(self.engine)
        self.refs = {}
        for name in ("A", "B", "C"):
            tenant_id = self.admin("POST", "/tenants", {"name": f"Fuzz {name}"})["tenant_id"]
            self.refs[name] = tenant_id
            self.refs[f"{name}.token"] = self.admin("POST", f"/tenants/{tenant_id}/scim", {"provider": "entra"})["token"]
        for name in ("A", "B"):
            u1 = self.scim(name, "POST", "/Users", {
                "schemas": [USER, ENTERPRISE], "userName": f"one@{name.lower()}.example", "active": True,
                "emails": [{"value": f"one@{name.lower()}.example", "type": "work", "primary": True}],
                "roles": [{"value": "Admin"}], "name": {"givenName": "Ada", "familyName": "Lovelace"},
                ENTERPRISE: {"department": "R&D", "manager": {"value": "x"}},
            })
            u2 = self.scim(name, "POST", "/Users", {"schemas": [USER], "userName": f"two@{name.lower()}.example"})
            g1 = self.scim(name, "POST", "/Groups", {"schemas": [GROUP], "displayName": f"Staff {name}",
                                                     "members": [{"value": u1["id"]}]})
            g2 = self.scim(name, "POST", "/Groups", {"schemas": [GROUP], "displayName": f"Empty {name}"})
            self.refs.update({f"{name}.u1": u1["id"], f"{name}.u2": u2["id"], f"{name}.g1": g1["id"],
                              f"{name}.g2": g2["id"]})
            self.admin("PUT", f"/tenants/{self.refs[name]}/scim/config", {
                "user_groups": [g1["id"]], "admin_groups": [], "auto_invite": False,
                "license_groups": {"starter": [g2["id"]], "team": [], "enterprise": []},
            })
        self.admin("DELETE", f"/tenants/{self.refs['C']}/scim")
        self.before = fingerprint(self.reader)
        self.since_reset = 0

    def after_write(self, method: str, path: str, response: httpx.Response) -> None:
        """Keep the seeds usable without a reset: a new token of A or B (rotated or reconnected by
        the admin API) is taken from the answer, a disconnected A or B is connected again, and a
        deleted second seed is created again (each one request)."""
        admin = _ADMIN_SCIM.match(path)
        if admin and admin.group(1) in ("A", "B"):
            name = admin.group(1)
            if method == "POST":
                self.refs[f"{name}.token"] = response.json()["token"]
            elif method == "DELETE" and admin.group(2) is None:
                self.refs[f"{name}.token"] = self.admin("POST", f"/tenants/{self.refs[name]}/scim",
                                                        {"provider": "entra"})["token"]
                self.before = fingerprint(self.reader)
            return
        if method != "DELETE":
            return
        for name in ("A.u2", "A.g2"):
            if path.endswith("/" + f"@{name}@"):
                if name == "A.u2":
                    body = {"schemas": [USER], "userName": f"two-{self.since_reset}@a.example"}
                    self.refs[name] = self.scim("A", "POST", "/Users", body)["id"]
                else:
                    body = {"schemas": [GROUP], "displayName": "Empty A"}
                    self.refs[name] = self.scim("A", "POST", "/Groups", body)["id"]
                self.before = fingerprint(self.reader)

    def resolve(self, value: str) -> str:
        """Put the seeded ids and tokens in place of their @names@."""
        return _REF.sub(lambda m: self.refs.get(m.group(1), m.group(0)), value)


_REF = re.compile(r"@([ABC](?:\.(?:u1|u2|g1|g2|token))?)@")
_REF_BYTES = re.compile(_REF.pattern.encode())
_ADMIN_SCIM = re.compile(r"/admin/api/tenants/@([ABC])@/scim(/token)?$")


def _fingerprint_sql(engine: Engine) -> str:
    """One UNION ALL over every tenant table: (tenant, table, row as text); one round trip per check."""
    parts = []
    for table in (*TENANT_TABLES, "tenant"):
        columns = [c["name"] for c in sa_inspect(engine).get_columns(table)]
        # last_request_at is when a valid token was last seen: a refused request with a valid
        # token may write it (api/scim/endpoints.py), and it is not the tenant's data.
        columns = [c for c in columns if c != "last_request_at"]
        row = " || '|' || ".join(f"COALESCE(CAST({c} AS TEXT), '~')" for c in columns)
        owner = "id" if table == "tenant" else "tenant_id"
        parts.append(f"SELECT {owner} AS owner, '{table}' AS tbl, {row} AS line FROM {table}")
    union = " UNION ALL ".join(parts)
    if engine.dialect.name == "postgresql":
        # Hashed on the server: a few rows come back instead of every row.
        return (f"SELECT owner, tbl, count(*), md5(string_agg(line, E'\\n' ORDER BY line)) "
                f"FROM ({union}) AS rows GROUP BY owner, tbl")
    return union


def fingerprint(connection: Connection) -> dict[tuple[str, str], tuple[int, str]]:
    """(tenant, table) → (row count, hash of its rows), for every tenant's data.

    One connection is kept for these reads (a new SQLite connection costs its PRAGMAs each
    time); each read ends its transaction, so the next one sees what was committed since.
    """
    sql = _FINGERPRINT_SQL.get(id(connection.engine))
    if sql is None:
        sql = _FINGERPRINT_SQL[id(connection.engine)] = _fingerprint_sql(connection.engine)
    rows: dict[tuple[str, str], list[str]] = {}
    try:
        result = connection.exec_driver_sql(sql)
        if connection.dialect.name == "postgresql":
            return {(owner, table): (count, digest) for owner, table, count, digest in result}
        for owner, table, line in result:
            rows.setdefault((owner, table), []).append(line)
    finally:
        connection.rollback()
    return {
        key: (len(lines), hashlib.blake2b("\n".join(sorted(lines)).encode("utf-8", "surrogatepass")).hexdigest())
        for key, lines in rows.items()
    }


_FINGERPRINT_SQL: dict[int, str] = {}


def changes(before: dict, after: dict) -> list[str]:
    return [f"{tenant}/{table}: {before.get((tenant, table))} -> {after.get((tenant, table))}"
            for tenant, table in sorted(set(before) | set(after)) if before.get((tenant, table)) != after.get((tenant, table))]


class InProcess:
    """The app driven through httpx's ASGI transport on one event loop of this thread: no server,
    no socket, and one thread hop fewer per request than Starlette's TestClient."""

    def __init__(self, app: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fuzz.test")
        # The app's lifespan (the transport does not run it): its shutdown closes the async pool.
        self.lifespan = app.router.lifespan_context(app)
        self.loop.run_until_complete(self.lifespan.__aenter__())

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        return self.loop.run_until_complete(self.client.request(method, url, **kwargs))

    def close(self) -> None:
        self.loop.run_until_complete(self.client.aclose())
        self.loop.run_until_complete(self.lifespan.__aexit__(None, None, None))
        self.loop.close()


@pytest.fixture(scope="module")
def world(base_settings, engine) -> Iterator[World]:
    # No rate limit and no failed-auth throttle: the fuzz must reach the handlers, not a 429.
    settings = dataclasses.replace(base_settings, scim_rate_limit=0, scim_auth_failure_limit=0)
    services = Services.from_settings(settings)
    services.engine.dispose()
    services.engine = engine
    client = InProcess(create_app(settings, services))
    reader = engine.connect()
    try:
        yield World(client, engine, reader)
    finally:
        reader.close()
        client.close()
        wipe(engine)


@dataclasses.dataclass(frozen=True)
class Req:
    """A generated request; strings may hold @names@ of seeded ids and tokens."""

    method: str
    path: str
    params: tuple[tuple[str, str], ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None

    def __repr__(self) -> str:
        def short(value: Any) -> str:
            shown = repr(value)
            return shown if len(shown) <= 300 else f"{shown[:200]}…<{len(shown)} chars>…{shown[-60:]}"

        return (f"Req({self.method} {short(self.path)} params={short(self.params)} headers={short(self.headers)} "
                f"body={short(self.body)})")

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        # Hypothesis prints failing examples with its pretty printer: keep megabyte bodies out of it.
        printer.text(repr(self))


def send(world: World, request: Req, surface: str) -> None:
    """Send one request; assert no 5xx, and no change unless it was an accepted write."""
    if world.since_reset >= RESET_EVERY:
        world.reset()
    world.since_reset += 1
    # Header values and the query go as bytes: any text, lone surrogates included, as UTF-8.
    headers = {name: world.resolve(value).encode("utf-8", "surrogatepass") for name, value in request.headers}
    url = world.resolve(request.path)
    if request.params:
        query = []
        for name, value in request.params:
            quoted = quote(world.resolve(value).encode("utf-8", "surrogatepass"), safe="")
            # URLs stop at 64 KiB in the client (as in servers): a longer value is cut, whole escapes kept.
            query.append(f"{quote(name)}={quoted[:20_000].rsplit('%', 1)[0] if len(quoted) > 20_000 else quoted}")
        url += "?" + "&".join(query)
    body = request.body
    if body is not None and b"@" in body:
        body = _REF_BYTES.sub(lambda m: world.refs.get(m.group(1).decode(), m.group(0).decode()).encode(), body)
    _t0 = time.perf_counter()
    response = world.client.request(request.method, url, headers=headers, content=body)
    TIMES["request"] += time.perf_counter() - _t0
    SENT[surface] += 1
    status = response.status_code
    STATUSES[status] += 1
    assert status < 500, f"{request.method} {request.path} -> {status}: {response.text[:500]}"
    _t0 = time.perf_counter()
    after = fingerprint(world.reader)
    TIMES["fingerprint"] += time.perf_counter() - _t0
    accepted_write = 200 <= status < 300 and request.method not in ("GET", "HEAD")
    if not accepted_write:
        diff = changes(world.before, after)
        assert not diff, f"{request.method} {request.path} answered {status} but changed: {diff[:5]}"
    if status in (401, 403):
        assert status == 401 or request.path.startswith("/admin"), response.text
    if request.path.startswith("/scim/") and status >= 400 and request.method != "HEAD":
        # RFC 7644 §3.12: every SCIM error is a SCIM error body.
        body_json = response.json()
        assert body_json.get("status") == str(status), body_json
    world.before = after
    if accepted_write:
        world.after_write(request.method, request.path, response)


# ---------------------------------------------------------------- hostile values


EDGE_STRINGS = [
    "", " ", "\x00", "a\x00b", "\ud800", "a\udfffb", "\ufeff", "\u202eevil", "\u200f\u200e", "שלום", "مرحبا",
    "e" + "\u0301" * 64, "ǅ", "İ", "ß" * 300, "ﬃ" * 200, "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "😀" * 10, "\u0085\u2028\u2029", "\r\n\t",
    "%00", "%", "../..", "/", "\\", '"', "'", "' OR 1=1 --", "${jndi:ldap://x}", "<script>", "null", "true",
    "1e999", "-0", "NaN", "[]", "{}", "a" * 513, "x" * 5000, "@A.u1@", "@B.u1@", "@A.g1@", "@B.g1@",
    "2024-01-01T00:00:00Z", "9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00", "2024-13-45",
    "Admin", "work", "User", "Group", "True", "False",
]

ATTRIBUTE_NAMES = [
    "userName", "USERNAME", "displayName", "externalId", "id", "meta", "schemas", "active", "title", "nickName",
    "name", "name.givenName", "name.familyName", "emails", "emails.value", "emails.type", "phoneNumbers",
    "addresses", "roles", "groups", "members", "members.value", "password", "x509Certificates", "entitlements",
    "ims", "photos", "profileUrl", "locale", "timezone", "userType", "preferredLanguage",
    f"{ENTERPRISE}:manager", f"{ENTERPRISE}:manager.value", f"{ENTERPRISE}:department", ENTERPRISE,
    f"{USER}:userName", f"{GROUP}:displayName", "urn:unknown:schema:attr", "meta.created", "meta.lastModified",
    "meta.version", "unknown", "a.b.c", "$ref", "emails[type eq \"work\"]", "", "x" * 300,
]

def _text_pool(size: int, seed: int) -> list[str]:
    """Seeded odd strings: every Unicode plane and category we care about, lengths from 0 to 70,000.

    Drawn from a pool (sampled_from) rather than st.text(): Hypothesis spends milliseconds per
    generated string, and the fuzz must send thousands of requests in well under two minutes.
    """
    palette = (
        [chr(c) for c in range(0x20, 0x7F)] + ["\x00", "\x01", "\x1f", "\x7f", "\x85", "\xa0", "\xad"]
        + ["é", "ß", "İ", "ǅ", "ﬃ", "Ω", "Ж", "中", "𝔘", "😀", "\U0010ffff", "\ufffd", "\ufeff"]
        + ["\u0301", "\u0308", "\u200b", "\u200d", "\u200e", "\u200f", "\u202e", "\u2028", "א", "ب"]
        + ["\ud800", "\udfff", "\ud83d"]
    )
    rng = random.Random(seed)
    out = []
    for _ in range(size):
        length = rng.choice([0, 1, 2, 3, 5, 8, 13, 21, 34, 64, 255, 256, 513, 1000, 5000, 70_000])
        if length > 1000:
            out.append(rng.choice(palette) * length)
        else:
            out.append("".join(rng.choice(palette) for _ in range(length)))
    return out


TEXT_POOL = EDGE_STRINGS + _text_pool(400, 8)
text_values = st.sampled_from(TEXT_POOL)
names = st.one_of(st.sampled_from(ATTRIBUTE_NAMES), st.sampled_from(EDGE_STRINGS), st.sampled_from(TEXT_POOL[:200]))
scalars = st.one_of(
    st.sampled_from([None, True, False, 0, -1, 1, 2**31, 2**63, 2**64, -(2**70), 1.5, -0.0, 1e308, 5e-324]),
    text_values,
)
_SIZES = st.integers(0, 3)
_KINDS = st.integers(0, 9)


@st.composite
def _json(draw: st.DrawFn, depth: int) -> Any:
    """Any JSON value, up to 3 levels (st.recursive costs several times more per draw)."""
    kind = draw(_KINDS)
    if depth >= 2 or kind < 6:
        return draw(scalars)
    inner = _JSON[depth + 1]
    if kind < 8:
        return [draw(inner) for _ in range(draw(_SIZES))]
    return {draw(names): draw(inner) for _ in range(draw(_SIZES))}


_JSON = [_json(depth) for depth in range(3)]
json_values = _JSON[0]
member_refs = st.sampled_from(["@A.u1@", "@A.u2@", "@A.g1@", "@A.g2@", "@B.u1@", "@B.g1@", "@C@", "nope"])
member_lists = st.lists(
    st.one_of(
        st.fixed_dictionaries({"value": member_refs}, optional={"type": st.sampled_from(["User", "Group", "x"]),
                                                               "$ref": st.none(), "display": text_values}),
        json_values,
    ),
    max_size=6,
)
emails = st.lists(st.fixed_dictionaries({}, optional={
    "value": text_values, "type": st.one_of(st.sampled_from(["work", "home", "other"]), json_values),
    "primary": st.one_of(st.booleans(), st.sampled_from(["True", "false", "yes"]), json_values),
}), max_size=5)
typed_attribute_values = {
    "userName": text_values, "displayName": text_values, "externalId": text_values,
    "active": st.one_of(st.booleans(), st.sampled_from(["True", "False", "TRUE", "yes", "1"]), json_values),
    "emails": st.one_of(emails, json_values),
    "roles": st.one_of(json_values, st.just('[{"value":"Admin","primary":true}]'), st.just('[[[[[[[["x"]]]]]]]]')),
    "name": st.one_of(st.dictionaries(st.sampled_from(["givenName", "familyName", "formatted", "x"]), scalars),
                      json_values),
    "members": st.one_of(member_lists, json_values),
    ENTERPRISE: st.one_of(st.fixed_dictionaries({}, optional={
        "manager": st.one_of(member_refs, st.fixed_dictionaries({"value": member_refs}), json_values),
        "department": text_values, "managerId": text_values}), json_values),
    "urn:scim:schemas:extension:enterprise:1.0": json_values,
    "schemas": st.one_of(st.just([USER]), st.just([GROUP]), json_values),
    "title": json_values, "groups": json_values, "password": text_values, "meta": json_values,
    "phoneNumbers": json_values, "x509Certificates": json_values,
}


def resource_bodies(schema: str) -> st.SearchStrategy[Any]:
    """A resource body: the right schemas and a few attributes of odd values, or anything at all."""
    first = "userName" if schema == USER else "displayName"
    return st.one_of(
        st.builds(
            lambda base, extra: {**base, **extra},
            st.fixed_dictionaries({"schemas": st.one_of(st.just([schema]), json_values), first: text_values}),
            st.fixed_dictionaries({}, optional=typed_attribute_values),
        ),
        json_values,
    )


USER_BODIES = resource_bodies(USER)
GROUP_BODIES = resource_bodies(GROUP)

# ---------------------------------------------------------------- filters and paths

compare_ops = st.sampled_from(["eq", "ne", "co", "sw", "ew", "gt", "ge", "lt", "le", "EQ", "pr", "xx", "=", ""])
literal = st.one_of(
    st.sampled_from(['"x"', '"\\ud800"', '"a\\udfffb"', '"\\u0000"', '"a\\"b"', '"\\x"', "true", "false", "null",
                     "1", "-1.5e3", "1e999", "99999999999999999999999", '"2024-01-01T00:00:00Z"',
                     '"9999-12-31T23:59:59-14:00"', '"0001-01-01T00:00:00+14:00"', '"9999-12-31"', '"2024-02-30"',
                     '"2024-01-01T25:00:00Z"', '"@A.u1@"', '"@B.u1@"', '"@A.g1@"', "'single'", '"unterminated']),
    text_values.map(lambda s: json.dumps(s)),
)
filter_attrs = st.one_of(
    # Half the time an attribute with a column: those filters reach the database.
    st.sampled_from(["userName", "id", "externalId", "active", "displayName", "meta.created", "meta.lastModified",
                     "members.value", "members", f"{USER}:userName"]),
    st.sampled_from(ATTRIBUTE_NAMES + ["not", "and", "or", "(", ")", "[", "]"]),
)


@st.composite
def filters(draw: st.DrawFn, depth: int = 0) -> str:
    """A filter: mostly grammatical (RFC 7644 §3.4.2.2) with hostile parts, sometimes junk."""
    kind = draw(_FILTER_KINDS[min(depth, 2)])
    if kind <= 9:
        op = draw(compare_ops)
        attr = draw(filter_attrs)
        return f"{attr} {op}" if op == "pr" else f"{attr} {op} {draw(literal)}"
    inner = _FILTERS[depth + 1]
    if kind <= 11:
        return f"not ({draw(inner)})"
    if kind <= 13:
        return f"({draw(inner)})"
    if kind <= 15:
        return f"{draw(_VALUE_PATH_HEADS)}[{draw(inner)}]"
    if kind <= 17:
        return draw(_JOINERS).join(draw(_INNER_LISTS[depth + 1]))
    if kind == 18:
        # Many terms: around SCIM_MAX_FILTER_TERMS (200), or nested deep.
        n = draw(_BIG_N)
        return " or ".join(f'userName eq "u{i}"' for i in range(n)) if n % 2 else "not (" * n + "a pr" + ")" * n
    return draw(_JUNK_FILTERS)


# Built once: Hypothesis works out each new strategy object's properties, which costs per draw.
_VALUE_PATH_HEADS = st.sampled_from(["emails", "members", "roles", "name", "x"])
_JOINERS = st.sampled_from([" and ", " or ", " AND ", " Or ", " ", " not "])
# Kinds 0-9 compare, 10-17 combine, 18 is huge (one in twenty at the top), 19 is junk.
_BIG_N = st.integers(150, 260)
_JUNK_FILTERS = st.one_of(text_values, st.integers(9_000, 11_000).map(lambda n: 'userName eq "' + "x" * n + '"'))
_FILTER_KINDS = [st.integers(0, 19), st.integers(0, 17), st.integers(0, 9)]
_FILTERS = [filters(depth) for depth in range(4)]
_INNER_LISTS = [st.lists(f, min_size=2, max_size=3) for f in _FILTERS]
any_filter = _FILTERS[0]

patch_paths = st.one_of(
    st.sampled_from(ATTRIBUTE_NAMES),
    st.sampled_from([
        'emails[type eq "work"].value', 'emails[type eq "work"]', 'members[value eq "@A.u1@"]',
        'members[value eq "@B.u1@"]', 'roles[primary eq "True"].value', 'emails[value eq "\\ud800"].type',
        'addresses[type eq "work"].streetAddress', f'{ENTERPRISE}:manager', 'name.givenName', 'members.value',
        'emails[type eq "work"].bogus', 'emails[', 'emails]', 'emails[type eq "work"]]', 'members[not(value pr)]',
    ]),
    st.tuples(st.sampled_from(["emails", "roles", "members", "addresses", "phoneNumbers", "name", "x509Certificates"]),
              st.tuples(st.sampled_from(["type", "value", "primary", "display", "bogus"]), compare_ops, literal),
              st.sampled_from(["", ".value", ".type", ".primary", ".display", ".bogus", "."])).map(
        lambda t: f"{t[0]}[{t[1][0]} {t[1][1]} {t[1][2]}]{t[2]}"),
    any_filter.map(lambda f: f"emails[{f}]"),
    text_values,
)
patch_ops = st.one_of(
    st.fixed_dictionaries(
        {"op": st.sampled_from(["add", "replace", "remove", "Add", "Replace", "REMOVE"])},
        optional={"path": st.one_of(patch_paths, json_values),
                  "value": st.one_of(json_values, member_lists, *typed_attribute_values.values())},
    ),
    st.fixed_dictionaries({"op": st.one_of(st.sampled_from(["copy", "move", "test", ""]), json_values)},
                          optional={"path": patch_paths, "value": json_values}),
    json_values,
)
patch_bodies = st.one_of(
    st.fixed_dictionaries({"schemas": st.one_of(st.just([PATCH_OP]), json_values),
                           "Operations": st.one_of(st.lists(patch_ops, max_size=5), json_values)}),
    st.integers(995, 1010).map(lambda n: {"schemas": [PATCH_OP], "Operations": [
        {"op": "replace", "path": "title", "value": "t"}] * n}),
    json_values,
)
search_bodies = st.one_of(
    st.fixed_dictionaries({"schemas": st.one_of(st.just([SEARCH]), json_values)}, optional={
        "filter": st.one_of(any_filter, json_values), "attributes": json_values, "excludedAttributes": json_values,
        "startIndex": json_values, "count": json_values, "sortBy": json_values, "sortOrder": json_values,
    }),
    json_values,
)
bulk_operations = st.fixed_dictionaries(
    {"method": st.one_of(st.sampled_from(["POST", "PUT", "PATCH", "DELETE", "GET", "post"]), json_values)},
    optional={
        "path": st.one_of(st.sampled_from(["/Users", "/Groups", "/Users/@A.u1@", "/Groups/@A.g1@", "/Users/@B.u1@",
                                           "/Users/bulkId:q1", "/Groups/bulkId:nope", "Users", "/Bulk"]), json_values),
        "bulkId": st.one_of(st.sampled_from(["q1", "q2"]), json_values),
        "data": st.one_of(USER_BODIES, GROUP_BODIES, patch_bodies),
        "version": json_values,
    },
)
bulk_bodies = st.one_of(
    st.fixed_dictionaries({"schemas": st.one_of(st.just([BULK]), json_values),
                           "Operations": st.one_of(st.lists(bulk_operations, max_size=4), json_values)},
                          optional={"failOnErrors": json_values}),
    json_values,
)


def encode(value: Any, how: int) -> bytes:
    """JSON text of `value`: ASCII escapes, raw UTF-8 (lone surrogates as invalid bytes) or with a BOM."""
    if how == 0:
        return json.dumps(value).encode()
    raw = json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return b"\xef\xbb\xbf" + raw if how == 2 else raw


raw_bodies = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([b"", b" ", b"null", b"[]", b"{}", b"NaN", b'{"a":1,"a":2}', b'{"schemas":', b"\xff\xfe",
                     b'"\\ud800"', b"1" * 400, b"[" * 300 + b"]" * 300, b'{"a":' * 40 + b"1" + b"}" * 40]),
    # Around SCIM_MAX_BODY_BYTES (2 MiB), rarely: each costs milliseconds to build and send.
    st.integers(-90, 32).map(lambda n: b"{}" if n < 0 else b'{"x":"' + b"a" * (2 * 1024 * 1024 - 16 + n) + b'"}'),
    st.integers(30, 40).map(lambda d: b'{"schemas":["%s"],"userName":"deep","title":%s1%s}' % (
        USER.encode(), b"[" * d, b"]" * d)),
)


_HOW = st.sampled_from([0, 0, 0, 1, 1, 2])


def _encoded(structured: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    # Four in five bodies are structured (they reach the handlers); the rest are raw bytes.
    # (one_of picks a branch uniformly; flatmap would build new strategies per draw.)
    encoded = st.tuples(structured, _HOW).map(lambda pair: encode(*pair))
    return st.one_of(raw_bodies, encoded, encoded, encoded, encoded)


BODIES = {
    "users": _encoded(st.one_of(USER_BODIES, patch_bodies)),
    "groups": _encoded(st.one_of(GROUP_BODIES, patch_bodies)),
    "search": _encoded(search_bodies),
    "bulk": _encoded(bulk_bodies),
    "other": _encoded(json_values),
}


# ---------------------------------------------------------------- requests

tokens = st.one_of(
    # Three in five: A's own token, so the request gets past authentication.
    st.just("Bearer @A.token@"), st.just("Bearer @A.token@"), st.just("Bearer @A.token@"),
    st.sampled_from(["Bearer @B.token@", "Bearer @C.token@", "Bearer", "Bearer ", "bearer @A.token@",
                     "Basic @A.token@", "Bearer @A.token@x", "Bearer  @A.token@", "Bearer " + "t" * 5000,
                     "Bearer " + ADMIN_TOKEN, "Bearer \u00e9\u00e8", "@A.token@", ""]),
    text_values.map(lambda s: "Bearer " + s),
)
content_types = st.sampled_from([
    "application/scim+json", "application/json", "application/scim+json; charset=utf-8", "text/plain",
    "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "", "application/scim+json; charset=latin-1",
])
scim_headers = st.lists(st.one_of(
    st.tuples(st.just("If-Match"), st.one_of(st.sampled_from(['W/"1"', '"1"', "*", 'W/"999"', "W/", ""]),
                                              text_values)),
    st.tuples(st.just("If-None-Match"), st.sampled_from(['W/"1"', "*", "x"])),
    st.tuples(st.just("Content-Length"), st.sampled_from(["999999999999", "-1", "abc"])),
), max_size=2)
def segment(value: str) -> str:
    """A path segment of any text (percent-encoded UTF-8), cut to 2,000 characters: URLs stop at 64 KiB."""
    quoted = quote(value.encode("utf-8", "surrogatepass"), safe="")
    return quoted if len(quoted) <= 2000 else quoted[:2000].rsplit("%", 1)[0]


tenant_segments = st.one_of(
    st.just("@A@"),
    st.sampled_from(["@B@", "@C@", "", "..", "%2e%2e", "nope", "@A@%00", "@A@/..", "x" * 300]),
    text_values.map(lambda s: segment(s)),
)
ids = st.one_of(
    st.sampled_from(["@A.u1@", "@A.u2@", "@A.g1@", "@A.g2@", "@B.u1@", "@B.g1@", "@C@", "nope", "%00", "x" * 400]),
    text_values.map(lambda s: segment(s)),
)
query_params = st.lists(st.tuples(
    st.sampled_from(["filter", "attributes", "excludedAttributes", "startIndex", "count", "sortBy", "sortOrder",
                     "format", "filter"]),
    st.one_of(any_filter, text_values, st.sampled_from(["-1", "0", "1", "2147483648", "99999999999999999999", "1.5",
                                                       "\u0663", "descending", "userName", "emails.value"]),
              st.integers(95, 110).map(lambda n: ",".join(["userName"] * n))),
), max_size=3)


OWN_TENANT = st.just("@A@")
# (body kind, path, methods it serves)
_SCIM_ROUTES = st.sampled_from((
    ("users", "/Users", ("GET", "POST")), ("users", "/Users/{id}", ("GET", "PUT", "PATCH", "DELETE")),
    ("groups", "/Groups", ("GET", "POST")), ("groups", "/Groups/{id}", ("GET", "PUT", "PATCH", "DELETE")),
    ("users", "/Users/@A.u1@", ("GET", "PUT", "PATCH")), ("groups", "/Groups/@A.g1@", ("GET", "PUT", "PATCH")),
    ("search", "/Users/.search", ("POST",)), ("search", "/Groups/.search", ("POST",)), ("search", "/.search", ("POST",)),
    ("bulk", "/Bulk", ("POST",)), ("bulk", "/Bulk", ("POST",)),
    ("other", "/ServiceProviderConfig", ("GET",)), ("other", "/Schemas", ("GET",)),
    ("other", f"/Schemas/{USER}", ("GET",)), ("other", "/Schemas/{id}", ("GET",)), ("other", "/ResourceTypes", ("GET",)),
    ("other", "/ResourceTypes/{id}", ("GET",)), ("other", "/{id}", ("GET",)), ("users", "/Users/{id}/{id}", ("GET",)),
))
_METHODS = st.sampled_from(("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE"))


@st.composite
def scim_requests(draw: st.DrawFn, tenant: st.SearchStrategy[str] = OWN_TENANT) -> Req:
    """One SCIM request: route, method, params, headers and a body fit (or not) for that route."""
    route, suffix, methods = draw(_SCIM_ROUTES)
    while "{id}" in suffix:
        suffix = suffix.replace("{id}", draw(ids), 1)
    # Mostly a method the route serves (the request reaches its handler), sometimes any.
    method = draw(st.one_of(st.sampled_from(methods), st.sampled_from(methods), st.sampled_from(methods), _METHODS))
    headers = [("Authorization", draw(tokens))] if draw(st.integers(0, 19)) else []
    headers.append(("Content-Type", draw(content_types)))
    headers.extend(draw(scim_headers))
    body = draw(BODIES[route]) if method in ("POST", "PUT", "PATCH") or draw(st.integers(0, 9)) == 0 else None
    return Req(method, f"/scim/v2/{draw(tenant)}{suffix}", tuple(draw(query_params)), tuple(headers), body)


sort_params = st.tuples(st.sampled_from(["sortBy", "sortOrder", "startIndex", "count", "attributes",
                                         "excludedAttributes"]),
                        st.one_of(st.sampled_from(["userName", "displayName", "meta.created", "emails.value", "x",
                                                   "descending", "-5", "0", "2147483648", "1e3", "members"]),
                                  text_values))


_SORT_LISTS = {n: st.lists(sort_params, max_size=n) for n in (1, 2)}


@st.composite
def query_requests(draw: st.DrawFn) -> Req:
    """A list or search of A's Users or Groups with A's token: hostile filters, projections, paging, sorting."""
    resource = draw(st.sampled_from(("Users", "Groups")))
    params = [("filter", draw(any_filter))]
    params += draw(_SORT_LISTS[2])
    headers = (("Authorization", "Bearer @A.token@"), ("Content-Type", "application/scim+json"))
    if draw(st.integers(0, 3)):
        return Req("GET", f"/scim/v2/@A@/{resource}", tuple(params), headers)
    body = {"schemas": [SEARCH], **{name: value for name, value in params}}
    where = draw(st.sampled_from((f"/{resource}/.search", "/.search")))
    return Req("POST", f"/scim/v2/@A@{where}", (), headers, encode(body, draw(st.integers(0, 1))))


_WRITE_METHODS = st.sampled_from(("PATCH",) * 12 + ("PUT",) * 4 + ("POST",) * 3 + ("DELETE",))


@st.composite
def write_requests(draw: st.DrawFn) -> Req:
    """A write on A's own resources with A's token, the body fit for the method (mostly), its values hostile."""
    resource = draw(st.sampled_from(("Users", "Groups")))
    # DELETE is rare: a deleted seed makes the writes after it 404 until the next reset.
    method = draw(_WRITE_METHODS)
    if method == "DELETE":
        # Only the second seed is deleted; `send` puts a new one in its place.
        own = "@A.u2@" if resource == "Users" else "@A.g2@"
    else:
        own = draw(st.sampled_from(("@A.u1@", "@A.u2@") if resource == "Users" else ("@A.g1@", "@A.g2@")))
    path = f"/scim/v2/@A@/{resource}" + ("" if method == "POST" else f"/{own}")
    if method == "PATCH":
        body = draw(patch_bodies)
    elif method == "DELETE":
        body = None
    else:
        body = draw(USER_BODIES if resource == "Users" else GROUP_BODIES)
    headers = [("Authorization", "Bearer @A.token@"), ("Content-Type", "application/scim+json")]
    headers.extend(draw(scim_headers))
    params = tuple(draw(_SORT_LISTS[1]))
    return Req(method, path, params, tuple(headers), None if body is None else encode(body, draw(st.integers(0, 2))))


admin_paths = st.sampled_from((
    ("/tenants", ("POST",)), ("/tenants/{t}/scim", ("GET", "POST", "DELETE")), ("/tenants/{t}/scim/token", ("POST",)),
    ("/tenants/{t}/scim/config", ("GET", "PUT", "PUT")), ("/tenants/{t}/groups", ("GET",)),
    ("/tenants/{t}/users", ("GET",)), ("/tenants/{t}/users/{id}", ("DELETE",)), ("/tenants/{t}/licenses", ("GET",)),
    ("/tenants/{t}/purchases", ("GET",)), ("/tenants/{t}/sync", ("GET",)), ("/tenants/{t}", ("GET",)),
    ("/", ("GET",)), ("/tenants/{t}/scim/config/x", ("PUT",)),
))
admin_bodies = st.one_of(
    st.fixed_dictionaries({}, optional={
        "name": text_values, "stripe_customer_id": json_values, "stripe_subscription_id": json_values,
        "provider": st.one_of(st.sampled_from(["entra", "okta", "google", "onelogin", "pingone", "ENTRA"]),
                              json_values),
        "user_groups": st.one_of(st.lists(member_refs, max_size=3), json_values),
        "admin_groups": st.one_of(st.lists(member_refs, max_size=3), json_values),
        "license_groups": st.one_of(st.dictionaries(st.sampled_from(["starter", "team", "enterprise", "gold"]),
                                                    st.lists(member_refs, max_size=2)), json_values),
        "auto_invite": json_values, "seat_cap": json_values,
    }).map(lambda body: encode(body, 0)),
    st.tuples(json_values, st.integers(0, 2)).map(lambda pair: encode(*pair)),
    raw_bodies,
)


_ADMIN_TENANTS = st.sampled_from(("@A@", "@A@", "@B@", "@C@", "")).flatmap(lambda t: st.just(t) if t else ids)
# Three in four with the admin token (Hypothesis's one_of does not weigh repeated branches).
_ADMIN_TOKENS = st.integers(0, 3).flatmap(lambda n: tokens if n == 0 else st.just(f"Bearer {ADMIN_TOKEN}"))


@st.composite
def admin_requests(draw: st.DrawFn) -> Req:
    """One admin API request: any route and method, mostly the right token, hostile ids and bodies."""
    path, methods = draw(admin_paths)
    path = path.replace("{t}", draw(_ADMIN_TENANTS))
    path = path.replace("{id}", draw(ids))
    method = draw(st.one_of(st.sampled_from(methods), st.sampled_from(methods), _METHODS))
    token = draw(_ADMIN_TOKENS)
    headers = [("Authorization", token), ("Content-Type", draw(content_types))]
    body = draw(admin_bodies) if method in ("POST", "PUT", "PATCH") else None
    return Req(method, f"/admin/api{path}", tuple(draw(query_params)), tuple(headers), body)


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        derandomize=True,  # the same requests on every run: CI is reproducible
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )


# ---------------------------------------------------------------- the tests


def run_fuzz(world: World, strategy: st.SearchStrategy[Req], surface: str, examples: int, capsys) -> None:
    """Send `examples` generated requests through `send`, then say how many ran."""

    @fuzz_settings(examples)
    @given(request=strategy)
    def one(request: Req) -> None:
        send(world, request, surface)

    SENT[surface] = 0
    TIMES.clear()
    STATUSES.clear()
    started, cpu = time.perf_counter(), time.process_time()
    one()
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    with capsys.disabled():
        print(f"\n[fuzz] {surface}: {SENT[surface]} requests in {elapsed:.1f} s, {cpu:.1f} s of CPU (waiting on the "
              f"app {TIMES['request']:.1f} s, state checks {TIMES['fingerprint']:.1f} s): none answered 5xx, "
              f"none refused changed data; answers {dict(sorted(STATUSES.items()))}")
    assert SENT[surface] >= examples, f"only {SENT[surface]} {surface} requests ran"


def test_hostile_scim_requests_never_5xx_and_refused_ones_change_nothing(world, capsys):
    """Given tenants A and B with users, groups and mappings, and a disconnected C,
    When A's endpoints get generated requests (odd routes, methods, params, headers, bodies,
    B's ids, unicode edge cases, bad filters and PATCH paths, huge and deep bodies),
    Then none is answered 5xx, and none that is refused or only reads changes any tenant's data."""
    run_fuzz(world, scim_requests(), "scim", SCIM_EXAMPLES, capsys)


def test_hostile_filters_and_queries_never_5xx(world, capsys):
    """A's lists and searches with generated filters (RFC 7644 §3.4.2.2 grammar with hostile
    values: lone surrogates, out-of-range dates, 200+ terms, deep nesting), projections and
    paging: never a 5xx, and nothing changes."""
    run_fuzz(world, query_requests(), "queries", QUERY_EXAMPLES, capsys)


def test_hostile_writes_on_own_resources_never_5xx(world, capsys):
    """PATCH, PUT, POST and DELETE of A's own Users and Groups with A's token and odd bodies
    (bad PATCH paths and ops, wrong types, unicode edge cases, members of other tenants):
    never a 5xx, and a refused write changes nothing."""
    run_fuzz(world, write_requests(), "writes", WRITE_EXAMPLES, capsys)


def test_other_tenants_and_odd_tenant_urls_are_refused_without_a_trace(world, capsys):
    """The same hostile requests at B's, C's (disconnected) and made-up Tenant URLs, mostly with A's
    token: never a 5xx, and a refused request leaves every tenant as it was."""
    tenants = st.one_of(st.sampled_from(["@B@", "@C@"]), tenant_segments)
    run_fuzz(world, scim_requests(tenant=tenants), "tenancy", AUTH_EXAMPLES, capsys)


def test_hostile_admin_requests_never_5xx_and_refused_ones_change_nothing(world, capsys):
    """The admin API with hostile ids, bodies and tokens: never a 5xx; a refused call changes nothing."""
    run_fuzz(world, admin_requests(), "admin", ADMIN_EXAMPLES, capsys)
