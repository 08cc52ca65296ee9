"""The SCIM side of the PostgreSQL hot path (models/directory/hotpath.py): a group PATCH with the one Patcher."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable

from api.scim.patch import Patcher
from api.scim.render import group_doc
from api.scim.schema import GROUP_RESOURCE, PATCH_OP, normalise_resource
from models.directory.fields import optional_string, required_string
from models.directory.groups import _group_data
from models.directory.hotpath import AsyncDatabase
from models.directory.members import MemberChanges
from models.settings import ScimLimits


def added_members(body: Any, limits: ScimLimits) -> list[str] | None:
    """The member ids of a PATCH that only adds members, in one pass; None for any other PATCH.

    What IdPs send by the thousand: `{"op": "add", "path": "members", "value":
    [{"value": id}, …]}` (Entra writes "Add" and adds `"$ref": null`). Anything
    else, or anything the Patcher would refuse or count differently (an empty
    or non-string value, a bad type, past the limits), is None: the caller
    takes the general path, which gives the same answer and the same errors.
    """
    if type(body) is not dict:
        return None
    schemas = body.get("schemas")
    if schemas is not None and (type(schemas) is not list or PATCH_OP not in schemas):
        return None
    operations = body.get("Operations", body.get("operations"))
    if type(operations) is not list or not operations or len(operations) > limits.max_patch_operations:
        return None
    ids: dict[str, None] = {}
    refs = 0
    for operation in operations:
        if type(operation) is not dict:
            return None
        op, path, value = operation.get("op"), operation.get("path"), operation.get("value")
        if type(op) is not str or op.lower() != "add" or type(path) is not str or path.lower() != "members":
            return None
        if type(value) is not list:
            return None
        refs += len(value)
        if refs > limits.max_members:
            return None
        for item in value:
            if type(item) is not dict:
                return None
            member_id = item.get("value")
            if type(member_id) is not str or not member_id or "\x00" in member_id:
                return None
            member_type = item.get("type")
            if member_type is not None and member_type != "User" and member_type != "Group":
                return None
            ids[member_id] = None
    return list(ids)


async def patch_group(
    database: AsyncDatabase, tenant_id: str, digest: str, group_id: str, body: Any, check_version: Callable[[int], None],
    limits: ScimLimits,
) -> int | None:
    """PATCH a group in one short transaction on the loop; its new version, or None when the token is refused.

    The operations go through the same Patcher as the synchronous path; a PATCH
    that only changes members (what IdPs send) leaves the stored document as it
    is instead of re-normalising and rewriting it.
    """
    async with database.group_write(tenant_id, digest, group_id) as write:
        if write is None:
            return None
        locked = write.group
        check_version(locked.version - 1)  # the version before this write's bump
        stored = SimpleNamespace(data=locked.data, display_name=locked.display_name, external_id=locked.external_id)
        changes = MemberChanges()
        doc = Patcher(GROUP_RESOURCE, group_doc(stored), changes, limits=limits).apply(body)
        if doc != group_doc(stored):
            doc = normalise_resource(GROUP_RESOURCE, doc, limits)
            await write.rewrite(required_string(doc, "displayName"), optional_string(doc, "externalId"), _group_data(doc))
        await write.record_event(await write.apply_members(changes))
    return locked.version
