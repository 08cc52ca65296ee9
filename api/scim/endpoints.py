"""SCIM endpoints per tenant: Users, Groups, discovery (RFC 7644 §3)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Awaitable, Callable

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api.scim import discovery
from api.scim.bulk import run_bulk
from api.scim.errors import (
    InvalidFilterError,
    InvalidValueError,
    MethodNotAllowedError,
    NotFoundError,
    ScimError,
    UnauthorizedError,
    from_directory,
)
from api.scim.fastpath import added_members, patch_group
from api.scim.http import (
    OFF_LOOP_BYTES,
    Authenticator,
    AuthorizedTenant,
    Call,
    ScimResponse,
    contained,
    list_response,
    read_json,
)
from api.scim.patch import Patcher, member_values
from api.scim.query import DEFAULT_COUNT, MAX_RESULTS, list_resources
from api.scim.ratelimit import Gate, RedisPerLoop
from api.scim.render import (
    etag,
    group_doc,
    group_json,
    parse_attribute_list,
    project,
    user_doc,
    user_json,
    wants,
)
from api.scim.schema import (
    GROUP_RESOURCE,
    SEARCH_REQUEST,
    USER_RESOURCE,
    ResourceSchema,
    normalise_patched,
    normalise_resource,
)
from models.db import is_postgres, session_scope
from models.directory import groups, users
from models.directory.errors import DirectoryError
from models.directory.hotpath import AsyncDatabase
from models.directory.members import MemberChanges, groups_of, members_of
from models.settings import Settings
from models.tables import Tenant

Handler = Callable[[Session, AuthorizedTenant, Call], Response]
_TENANT = Tenant.__table__


class ScimApi:
    """The SCIM receiver: one short transaction per request, a wake-up after commit.

    On PostgreSQL `POST /Users`, the hot path of an IdP's first cycle, runs on
    the event loop through psycopg's async pool in one statement (fastpath.py);
    everything else runs synchronously in the thread pool.
    """

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        wake: Callable[[str], Any],
        *,
        wake_async: Callable[[str], Awaitable[Any]] | None = None,
        redis_url: str | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.wake = wake
        self.wake_async = wake_async
        self.auth = Authenticator()
        self._hot: dict[str, tuple[str, Callable[[Request], Any]]] = {}
        self.fast = AsyncDatabase(
            engine.url.render_as_string(hide_password=False),
            statement_timeout=settings.database_statement_timeout,
            connect_timeout=settings.database_connect_timeout,
            create_batch_max=settings.scim_create_batch_max,
            # One wake-up per batch of creates, sent by the batch's sender after its commit.
            after_create=self._wake_after_commit,
        ) if is_postgres(engine) else None
        self.gate = Gate(
            self._tenant_of_token,
            RedisPerLoop(redis_url, connect_timeout=settings.redis_connect_timeout,
                         socket_timeout=settings.redis_socket_timeout) if redis_url else None,
            settings.redis_namespace,
            rate_limit=settings.scim_rate_limit if redis_url else 0,
            auth_failure_limit=settings.scim_auth_failure_limit,
        )

    async def _tenant_of_token(self, digest: str) -> tuple[str, bool] | None:
        if self.fast is not None:
            try:
                return await self.fast.tenant_of(digest)
            except DirectoryError as exc:
                raise from_directory(exc) from None
        return await run_in_threadpool(self._tenant_of_token_sync, digest)

    def _tenant_of_token_sync(self, digest: str) -> tuple[str, bool] | None:
        with self.engine.connect() as connection:
            found = connection.execute(
                select(_TENANT.c.id, _TENANT.c.scim_enabled).where(_TENANT.c.token_hash == digest)
            ).first()
        return None if found is None else (found.id, bool(found.scim_enabled))

    async def close(self) -> None:
        if self.fast is not None:
            await self.fast.close()
        await self.gate.close()

    def routes(self) -> list[Route]:
        prefix = "/scim/v2/{tenant_id}"
        users_endpoint = self.endpoint(self.list_users, self.create_user)
        group_endpoint = self.endpoint(self.get_group, put=self.replace_group, patch=self.patch_group,
                                       delete=self.delete_group)
        # What hot_route serves without the router: the same endpoints, so the same behaviour.
        self._hot = {"POST": (prefix + "/Users", users_endpoint), "PATCH": (prefix + "/Groups/{id}", group_endpoint)}
        return [
            Route(prefix + "/Users", users_endpoint, methods=["GET", "POST"]),
            Route(prefix + "/Users/.search", self.endpoint(None, self.search_users), methods=["POST"]),
            Route(
                prefix + "/Users/{id}",
                self.endpoint(self.get_user, put=self.replace_user, patch=self.patch_user, delete=self.delete_user),
                methods=["GET", "PUT", "PATCH", "DELETE"],
            ),
            Route(prefix + "/Groups", self.endpoint(self.list_groups, self.create_group), methods=["GET", "POST"]),
            Route(prefix + "/Groups/.search", self.endpoint(None, self.search_groups), methods=["POST"]),
            Route(prefix + "/Groups/{id}", group_endpoint, methods=["GET", "PUT", "PATCH", "DELETE"]),
            Route(prefix + "/.search", self.endpoint(None, self.search_all), methods=["POST"]),
            Route(prefix + "/Bulk", contained(self.bulk_endpoint), methods=["POST"]),
            Route(prefix + "/ServiceProviderConfig", self.endpoint(self.service_provider_config), methods=["GET"]),
            Route(prefix + "/ResourceTypes", self.endpoint(self.resource_types), methods=["GET"]),
            Route(prefix + "/ResourceTypes/{id}", self.endpoint(self.resource_type), methods=["GET"]),
            Route(prefix + "/Schemas", self.endpoint(self.schemas), methods=["GET"]),
            Route(prefix + "/Schemas/{id:path}", self.endpoint(self.schema), methods=["GET"]),
        ]

    def hot_route(self, method: str, path: str) -> tuple[str, dict[str, str], Callable[[Request], Any]] | None:
        """`POST …/Users` and `PATCH …/Groups/{id}` on PostgreSQL (an IdP's first cycle): route template, path
        parameters and endpoint, matched as the router would (segments of one or more characters but `/`)."""
        if self.fast is None or method not in ("POST", "PATCH"):
            return None
        parts = path.split("/")
        if len(parts) < 5 or parts[1] != "scim" or parts[2] != "v2" or not parts[3]:
            return None
        if method == "POST" and len(parts) == 5 and parts[4] == "Users":
            template, endpoint = self._hot["POST"]
            return template, {"tenant_id": parts[3]}, endpoint
        if method == "PATCH" and len(parts) == 6 and parts[4] == "Groups" and parts[5]:
            template, endpoint = self._hot["PATCH"]
            return template, {"tenant_id": parts[3], "id": parts[5]}, endpoint
        return None

    # ------------------------------------------------------------ plumbing

    def endpoint(
        self,
        get: Handler | None = None,
        post: Handler | None = None,
        *,
        put: Handler | None = None,
        patch: Handler | None = None,
        delete: Handler | None = None,
    ) -> Callable[[Request], Any]:
        handlers = {"GET": get, "POST": post, "PUT": put, "PATCH": patch, "DELETE": delete}

        async def serve(request: Request) -> Response:
            handler = handlers.get(request.method)
            if handler is None:
                raise MethodNotAllowedError(f"{request.method} is not supported here.")
            digest = await self._admit(request)
            if request.method == "POST" and post == self.create_user and self.fast is not None:
                return await self._create_user_fast(request, digest)
            if (request.method == "PATCH" and patch == self.patch_group and self.fast is not None
                    and not request.query_params.get("attributes")):
                return await self._patch_group_fast(request, digest)
            call = await self._call(request, with_body=request.method in ("POST", "PUT", "PATCH"))
            return await run_in_threadpool(self.run, handler, call, request.method != "GET")

        return contained(serve)

    async def bulk_endpoint(self, request: Request) -> Response:
        """POST /Bulk: each operation in its own transaction, one wake-up at the end."""
        await self._admit(request)
        call = await self._call(request, with_body=True)
        return await run_in_threadpool(self._bulk, call)

    async def _admit(self, request: Request) -> str:
        """Token, failed-auth throttle and rate, on the headers alone: a refused request's body is never read."""
        if any("\x00" in value for value in request.path_params.values()):
            # No id holds U+0000, and PostgreSQL refuses it in a query parameter.
            raise NotFoundError("Not found.")
        client = request.client.host if request.client else None
        return await self.gate.admit(request.path_params["tenant_id"], request.headers.get("authorization"), client)

    async def _create_user_fast(self, request: Request, digest: str) -> Response:
        """POST /Users on PostgreSQL: token, user and sync event in one statement shared with the tenant's
        concurrent creates; the statement's sender wakes the reconcile after its commit, before this answers."""
        assert self.fast is not None
        call = await self._call(request, with_body=True)
        declared = request.headers.get("content-length") or ""
        large = not declared.isdigit() or int(declared) > OFF_LOOP_BYTES
        doc = (await run_in_threadpool(normalise_resource, USER_RESOURCE, call.body, call.limits) if large
               else normalise_resource(USER_RESOURCE, call.body, call.limits))
        try:
            row = await self.fast.create_user(call.tenant_id, digest, doc)
        except DirectoryError as exc:
            raise from_directory(exc) from None
        if row is None:
            # Revoked since the gate last saw it: revocation works at once.
            self.gate.forget(digest)
            raise UnauthorizedError()
        if self.auth.due(call.tenant_id):
            await self._touch(call.tenant_id)
        return self._projected(USER_RESOURCE, call, user_json(SimpleNamespace(**row), call.base_url), 201)

    async def _patch_group_fast(self, request: Request, digest: str) -> Response:
        """PATCH /Groups/{id} on PostgreSQL (an IdP's membership changes): one short transaction on the loop."""
        assert self.fast is not None
        call = await self._call(request, with_body=True)
        group_id = call.path["id"]
        # Only-adds-members with no If-Match (an IdP's bulk of PATCHes): one statement.
        added = None if call.headers.get("if-match") else added_members(call.body, call.limits)
        try:
            if added is not None and group_id not in added:
                version = await self.fast.add_group_members(call.tenant_id, digest, group_id, added)
            else:
                version = await patch_group(
                    self.fast, call.tenant_id, digest, group_id, call.body, call.check_if_match, call.limits
                )
        except DirectoryError as exc:
            raise from_directory(exc) from None
        if version is None:
            self.gate.forget(digest)
            raise UnauthorizedError()
        if self.auth.due(call.tenant_id):
            await self._touch(call.tenant_id)
        await self._wake_after_commit(call.tenant_id)
        # RFC 7644 §3.5.2 allows 204: a 1-member PATCH on a 20,000-member group
        # must not cost a 20,000-member answer.
        return Response(status_code=204, headers={"ETag": etag(version)})

    async def _touch(self, tenant_id: str) -> None:
        assert self.fast is not None
        try:
            await self.fast.touch(tenant_id)
        except DirectoryError:
            pass  # last_request_at is for the admin's eyes; the write itself is committed

    async def _wake_after_commit(self, tenant_id: str) -> None:
        # After the commit, never inside it: a broker outage cannot fail the write.
        if self.wake_async is not None:
            await self.wake_async(tenant_id)
        else:
            await run_in_threadpool(self.wake, tenant_id)

    async def _call(self, request: Request, *, with_body: bool) -> Call:
        """The request as the synchronous handlers see it (read on the event loop)."""
        tenant_id = request.path_params["tenant_id"]
        scope = request.scope
        return Call(
            tenant_id=tenant_id,
            # Straight from the ASGI scope (an IdP's create has no query string): Starlette's
            # QueryParams and Headers objects were ~2 % of a create's CPU.
            params=dict(request.query_params) if scope["query_string"] else {},
            headers={k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]},
            path=dict(request.path_params),
            body=await read_json(request, self.settings.max_body_bytes) if with_body else None,
            base_url=f"{self.settings.public_base_url}/scim/v2/{tenant_id}",
            limits=self.settings.scim_limits,
        )

    def _bulk(self, call: Call) -> Response:
        with session_scope(self.engine) as session:
            self.auth.tenant(session, call.tenant_id, call.headers.get("authorization"))
        response = run_bulk(call.body, call, lambda name, sub: self.run(getattr(self, name), sub, writes=False))
        self.wake(call.tenant_id)
        return response

    def run(self, handler: Handler, call: Call, writes: bool) -> Response:
        touched = False
        try:
            with session_scope(self.engine) as session:
                tenant, touched = self.auth.tenant(session, call.tenant_id, call.headers.get("authorization"))
                try:
                    response = handler(session, tenant, call)
                except DirectoryError as exc:
                    # Every SCIM call (Bulk operations too) passes here: the one translation.
                    raise from_directory(exc) from None
        except ScimError:
            if touched:
                # The refused request rolled back its last_request_at, yet the
                # IdP did reach us with a valid token: record it on its own.
                with session_scope(self.engine) as session:
                    self.auth.touch(session, call.tenant_id)
            raise
        if writes and response.status_code < 300:
            # After the commit, never inside it: a broker outage cannot fail the write.
            self.wake(call.tenant_id)
        return response

    @staticmethod
    def _projected(resource: ResourceSchema, call: Call, doc: dict[str, Any], status: int = 200) -> ScimResponse:
        attributes = parse_attribute_list(resource, call.params.get("attributes"), call.limits)
        excluded = parse_attribute_list(resource, call.params.get("excludedAttributes"), call.limits)
        headers = {"ETag": doc["meta"]["version"]}
        if status == 201:
            headers["Location"] = doc["meta"]["location"]
        return ScimResponse(project(resource, doc, attributes, excluded), status_code=status, headers=headers)

    @staticmethod
    def _locked_user(session: Session, tenant: AuthorizedTenant, call: Call) -> Any:
        """The user a write names, locked, and still at the version If-Match asks for."""
        user = users.get_user(session, tenant.id, call.path["id"], lock=True)
        call.check_if_match(user.version)
        return user

    @staticmethod
    def _locked_group(session: Session, tenant: AuthorizedTenant, call: Call) -> Any:
        """The group a write names, locked, and still at the version If-Match asks for."""
        group = groups.get_group(session, tenant.id, call.path["id"], lock=True)
        call.check_if_match(group.version)
        return group

    # ------------------------------------------------------------- users

    def create_user(self, session: Session, tenant: AuthorizedTenant, call: Call) -> Response:
        doc = normalise_resource(USER_RESOURCE, call.body, call.limits)
        user = users.create_user(session, tenant.id, doc)
        return self._projected(USER_RESOURCE, call, user_json(user, call.base_url), 201)

    def get_user(self, session: Session, tenant: AuthorizedTenant, call: Call) -> Response:
        user = users.get_user(session, tenant.id, call.path["id"])
        if call.headers.get("if-none-match") == etag(user.version):
            return Response(status_code=304, headers={"ETag": etag(user.version)})
        user_groups = groups_of(session, [user.id])[user.id]
        return self._projected(USER_RESOURCE, call, user_json(user, call.base_url, user_groups))

    def replace_user(self, session: Session, tenant: AuthorizedTenant, call: Call) -> Response:
        user = self._locked_user(session, tenant, call)
        doc = normalise_resource(USER_RESOURCE, call.body, call.limits)
        users.update_user(session, user, doc)
        user_groups = groups_of(session, [user.id])[user.id]
        return self._projected(USER_RESOURCE, call, user_json(user, call.base_url, user_groups))

    def patch_user(self, session: Session, tenant: AuthorizedTenant, call: Call) -> Response:
        user = self._locked_user(session, tenant, call)
        stored = user_doc(user)
        doc = Patcher(USER_RESOURCE, user_doc(user), limits=call.limits).apply(call.body)
        # Only what the operations changed is normalised again (the rest was when it was stored).
        users.update_user(session, user, normalise_patched(USER_RESOURCE, stored, doc, call.limits))
        user_groups = groups_of(session, [user.id])[user.id]
        return self._projected(USER_RESOURCE, call, user_json(user, call.base_url, user_groups))

    def delete_user(self, session: Session, tenant: AuthorizedTenant, call: Call) -> Response:
        user = self._locked_user(session, tenant, call)
        users.delete_user(session, user)
        return Response(status_code=204)

    def list_users(self, session: Session, tenant: AuthorizedTenant, call: Call) -> Response:
        return self._list(session, tenant, call, USER_RESOURCE, call.params)

    def search_users(self, session: Session, tenant: AuthorizedTenant, call: Call) -> Response:
        return self._list(session, tenant, call, USER_RESOURCE, _search_params(call.body))

    # ------------------------------------------------------------ groups

    def create_group(self, session: Session, tenant: AuthorizedTenant, call: Call) -> Response:
        doc = normalise_resource(GROUP_RESOURCE, call.body, call.limits)
        members = member_values(doc.pop("members", None))
        group = groups.create_group(session, tenant.id, doc, members)
        return self._projected(GROUP_RESOURCE, call, group_json(group, call.base_url, members_of(session, group.id)), 201)

    def get_group(self, session: Session, tenant: AuthorizedTenant, call: Call) -> Response:
        group = groups.get_group(session, tenant.id, call.path["id"])
        if call.headers.get("if-none-match") == etag(group.version):
            return Response(status_code=304, headers={"ETag": etag(group.version)})
        members = members_of(session, group.id) if self._wants_members(call) else None
        return self._projected(GROUP_RESOURCE, call, group_json(group, call.base_url, members))

    def replace_group(self, session: Session, tenant: AuthorizedTenant, call: Call) -> Response:
        group = self._locked_group(session, tenant, call)
        doc = normalise_resource(GROUP_RESOURCE, call.body, call.limits)
        changes = MemberChanges()
        # PUT carries the whole member list (Okta, PingOne): applied as a diff,
        # so only real changes become membership events.
        changes.replace_all(member_values(doc.pop("members", None)))
        groups.update_group(session, group, doc, changes)
        return self._projected(GROUP_RESOURCE, call, group_json(group, call.base_url, members_of(session, group.id)))

    def patch_group(self, session: Session, tenant: AuthorizedTenant, call: Call) -> Response:
        group = self._locked_group(session, tenant, call)
        changes = MemberChanges()
        doc = Patcher(GROUP_RESOURCE, group_doc(group), changes, limits=call.limits).apply(call.body)
        groups.update_group(session, group, normalise_resource(GROUP_RESOURCE, doc, call.limits), changes)
        if not call.params.get("attributes"):
            # RFC 7644 §3.5.2 allows 204: a 1-member PATCH on a 20,000-member
            # group must not cost a 20,000-member answer.
            return Response(status_code=204, headers={"ETag": etag(group.version)})
        members = members_of(session, group.id) if self._wants_members(call) else None
        return self._projected(GROUP_RESOURCE, call, group_json(group, call.base_url, members))

    def delete_group(self, session: Session, tenant: AuthorizedTenant, call: Call) -> Response:
        group = self._locked_group(session, tenant, call)
        groups.delete_group(session, group)
        return Response(status_code=204)

    def list_groups(self, session: Session, tenant: AuthorizedTenant, call: Call) -> Response:
        return self._list(session, tenant, call, GROUP_RESOURCE, call.params)

    def search_groups(self, session: Session, tenant: AuthorizedTenant, call: Call) -> Response:
        return self._list(session, tenant, call, GROUP_RESOURCE, _search_params(call.body))

    def search_all(self, session: Session, tenant: AuthorizedTenant, call: Call) -> Response:
        """POST /.search at the root (RFC 7644 §3.4.3): Users, then Groups, paged together."""
        params = _search_params(call.body)
        sub_call = Call(call.tenant_id, params, call.headers, call.path, None, call.base_url, call.limits)
        start_index = max(1, sub_call.int_param("startIndex", 1))
        count = max(0, min(sub_call.int_param("count", DEFAULT_COUNT), MAX_RESULTS))
        docs: list[dict[str, Any]] = []
        errors: list[InvalidFilterError] = []
        for resource in (USER_RESOURCE, GROUP_RESOURCE):
            try:
                page = list_resources(
                    session, tenant.id, resource.name, call.base_url,
                    filter_text=params.get("filter"), start_index=1, count=MAX_RESULTS,
                    sort_by=None, descending=False,
                    with_members=resource is GROUP_RESOURCE and self._wants_members(call, params),
                    limits=call.limits,
                )
            except InvalidFilterError as exc:
                # An attribute only one resource type has filters that type alone.
                errors.append(exc)
                continue
            attributes = parse_attribute_list(resource, params.get("attributes"), call.limits)
            excluded = parse_attribute_list(resource, params.get("excludedAttributes"), call.limits)
            docs.extend(project(resource, doc, attributes, excluded) for doc in page.docs)
        if len(errors) == 2:
            raise errors[0]
        return list_response(len(docs), start_index, docs[start_index - 1:start_index - 1 + count])

    @staticmethod
    def _wants_members(call: Call, params: dict[str, Any] | None = None) -> bool:
        params = call.params if params is None else params
        attributes = parse_attribute_list(GROUP_RESOURCE, params.get("attributes"), call.limits)
        excluded = parse_attribute_list(GROUP_RESOURCE, params.get("excludedAttributes"), call.limits)
        if attributes:
            return wants(attributes, "members")
        # Entra reads groups with excludedAttributes=members: never load them then.
        return not wants(excluded, "members")

    def _list(self, session: Session, tenant: AuthorizedTenant, call: Call, resource: ResourceSchema, params: dict[str, Any]) -> Response:
        sub_call = Call(call.tenant_id, params, call.headers, call.path, None, call.base_url, call.limits)
        start_index = sub_call.int_param("startIndex", 1)
        count = sub_call.int_param("count", DEFAULT_COUNT)
        sort_order = str(params.get("sortOrder") or "ascending").lower()
        if sort_order not in ("ascending", "descending"):
            raise InvalidValueError("'sortOrder' must be 'ascending' or 'descending'.")
        page = list_resources(
            session,
            tenant.id,
            resource.name,
            call.base_url,
            filter_text=params.get("filter"),
            start_index=start_index,
            count=count,
            sort_by=params.get("sortBy"),
            descending=sort_order == "descending",
            with_members=resource is GROUP_RESOURCE and self._wants_members(call, params),
            limits=call.limits,
        )
        attributes = parse_attribute_list(resource, params.get("attributes"), call.limits)
        excluded = parse_attribute_list(resource, params.get("excludedAttributes"), call.limits)
        docs = [project(resource, doc, attributes, excluded) for doc in page.docs]
        return list_response(page.total, page.start_index, docs)

    # --------------------------------------------------------- discovery

    def service_provider_config(self, session: Session, tenant: AuthorizedTenant, call: Call) -> Response:
        return ScimResponse(discovery.service_provider_config(call.base_url, self.settings.max_body_bytes))

    def resource_types(self, session: Session, tenant: AuthorizedTenant, call: Call) -> Response:
        items = discovery.resource_types(call.base_url)
        return list_response(len(items), 1, items)

    def resource_type(self, session: Session, tenant: AuthorizedTenant, call: Call) -> Response:
        return ScimResponse(discovery.one_resource_type(call.base_url, call.path["id"]))

    def schemas(self, session: Session, tenant: AuthorizedTenant, call: Call) -> Response:
        items = discovery.schemas(call.base_url, call.limits, self.settings.max_body_bytes)
        return list_response(len(items), 1, items)

    def schema(self, session: Session, tenant: AuthorizedTenant, call: Call) -> Response:
        return ScimResponse(discovery.one_schema(call.base_url, call.path["id"], call.limits, self.settings.max_body_bytes))


def _search_params(body: Any) -> dict[str, Any]:
    """POST /.search (RFC 7644 §3.4.3): the same parameters, in a SearchRequest body."""
    if not isinstance(body, dict):
        raise InvalidValueError("A SearchRequest body must be a JSON object.")
    schemas = body.get("schemas")
    if schemas is not None and (not isinstance(schemas, list) or SEARCH_REQUEST not in schemas):
        raise InvalidValueError(f"'schemas' must be ['{SEARCH_REQUEST}'].")
    out: dict[str, Any] = {}
    for key in ("filter", "sortBy", "sortOrder", "startIndex", "count"):
        if body.get(key) is not None:
            out[key] = str(body[key])
    for key in ("attributes", "excludedAttributes"):
        value = body.get(key)
        if isinstance(value, list):
            out[key] = ",".join(str(v) for v in value)
        elif isinstance(value, str):
            out[key] = value
    return out
