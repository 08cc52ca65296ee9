"""New row ids (models/tables.py new_id): random version 4 UUIDs, never repeated, not even across a fork."""

from __future__ import annotations

import os
import uuid
import warnings

from models.tables import new_id


def test_ids_are_version_4_uuids_as_32_hex_digits_and_never_repeat():
    """Given 5,000 new ids (the randomness is read in blocks of 256)
    Then each is 32 lowercase hex digits that parse as an RFC 4122 version 4 UUID, and no two are equal."""
    ids = [new_id() for _ in range(5000)]

    assert len(set(ids)) == len(ids)
    for value in ids:
        parsed = uuid.UUID(hex=value)
        assert value == parsed.hex and parsed.version == 4 and parsed.variant == uuid.RFC_4122


def test_a_forked_child_does_not_hand_out_its_parents_ids():
    """Given a process that has read a block of randomness (and handed out one id of it)
    When it forks (Dramatiq's worker processes, uvicorn's with fork)
    Then the child's next ids are none of the parent's next ids."""
    new_id()
    read, write = os.pipe()
    with warnings.catch_warnings():
        # The test process runs threads (the live servers'); the child only makes ids and exits.
        warnings.simplefilter("ignore", DeprecationWarning)
        child = os.fork()
    if child == 0:
        try:
            os.write(write, " ".join(new_id() for _ in range(100)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child_ids = set(pipe.read().split())
    os.waitpid(child, 0)
    parent_ids = {new_id() for _ in range(100)}

    assert len(child_ids) == 100
    assert not child_ids & parent_ids
