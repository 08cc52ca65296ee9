"""The SCIM side of the PostgreSQL hot path (models/directory/hotpath.py): a group PATCH with the one Patcher."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable

from api.scim.patch import Patcher
from api.scim.render import group_doc
from api.scim.schema import GROUP_RESOURCE, normalise_resource
from models.directory.fields import optional_string, required_string
from models.directory.groups import _group_data
from models.directory.hotpath import AsyncDatabase
from models.directory.members import MemberChanges
from models.settings import ScimLimits


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
