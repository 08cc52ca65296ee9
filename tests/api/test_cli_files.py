"""Files that hold secrets (admin token, demo tenant, invitations) are the owner's alone from the first byte."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from api import cli
from models.settings import Settings
from tests.workers.support import build_invitation
from workers.mail.message import message_id
from workers.mail.transport import OutboxMailer


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def no_chmod(monkeypatch):
    """Any chmod after creation fails the test: the mode must be set when the file is created."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("a secret file was chmod'ed after creation")

    monkeypatch.setattr(os, "chmod", refuse)
    monkeypatch.setattr(Path, "chmod", refuse)
    old = os.umask(0)  # the most permissive umask: only the mode given at creation protects the file
    yield
    os.umask(old)


def test_admin_token_file_is_created_0600(tmp_path: Path, no_chmod):
    """Given no SALLY_ADMIN_TOKEN and a umask of 0, When `dev` makes the admin token,
    Then var/admin-token is created 0600 (never chmod'ed), and a second start reads the same token.
    """
    settings = Settings(var_dir=tmp_path)

    token = cli._admin_token(settings)

    path = tmp_path / "admin-token"
    assert _mode(path) == 0o600
    assert path.read_text() == token and len(token) >= 32
    assert cli._admin_token(settings) == token
    assert [p.name for p in tmp_path.iterdir()] == ["admin-token"], "no temporary file is left behind"


def test_write_private_replaces_an_existing_file_and_keeps_it_0600(tmp_path: Path, no_chmod):
    """Given a world-readable file, When write_private writes over it, Then the new file is 0600."""
    path = tmp_path / "demo-tenant.json"
    path.write_text("old")
    assert _mode(path) == 0o666

    cli.write_private(path, json.dumps({"token": "t"}))

    assert _mode(path) == 0o600 and json.loads(path.read_text()) == {"token": "t"}


def test_outbox_folder_and_messages_are_private(tmp_path: Path, no_chmod):
    """Given a umask of 0, When the outbox writes an invitation, Then the folder is 0700 and the message 0600."""
    outbox = OutboxMailer(tmp_path / "outbox")
    mail = build_invitation(
        mail_from="Sally <no-reply@sally.example>", to_address="ada@acme.example", display_name="Ada",
        tenant_name="Acme", login_url="https://sally.example", message_id=message_id("t1", "u1"),
    )

    outbox.send(mail)

    assert _mode(tmp_path / "outbox") == 0o700
    assert _mode(outbox.path_for(mail.message_id)) == 0o600
