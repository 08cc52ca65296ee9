"""The seed's flow in a real headless Chromium, end to end (issue 10).

Debian's ``chromium`` (``.ci/run`` installs it when /usr/bin/chromium is
missing) driven by Playwright from PyPI, pointed at that browser (never
``playwright install``). Everything else is real too: the app under uvicorn,
a ``sally-scim worker`` process on the real broker, the fake Stripe server
(through the real ``stripe`` library in the worker) and an SMTP server.
A screenshot of each step is saved under ``var/screenshots/admin-flow/``.
"""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import uvicorn

from tests.conftest import ADMIN_TOKEN, LiveServer
from tests.fakes.ports import free_port
from tests.workers.support import PRICES, ROOT, Idp, SlowSmtp, WorkerProcess, stripe_fake

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = ROOT / "var" / "screenshots" / "admin-flow"

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Debian's chromium is not installed (apt-get install -y chromium; .ci/run does)"
)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")


# Form controls (and buttons) without a label, aria-label or text: each would be a nameless stop for a screen reader.
UNLABELLED = """() => Array.from(document.querySelectorAll('input:not([type=hidden]), select, textarea, button'))
  .filter(el => !el.hidden && !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                && !(el.tagName === 'BUTTON' && el.textContent.trim()))
  .map(el => el.outerHTML.slice(0, 120))"""


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # the test runner owns signals
        pass


@pytest.fixture
def billed_stack(base_settings, clean_db, tmp_path: Path) -> Iterator[tuple[LiveServer, object, SlowSmtp, WorkerProcess]]:
    """A web server and a worker that both have Stripe (the fake), an SMTP server; stopped after."""
    from api.app import Services, create_app

    with stripe_fake() as fake, SlowSmtp() as smtp:
        port = free_port()
        settings = replace(
            base_settings, port=port, public_base_url=f"http://127.0.0.1:{port}",
            stripe_api_key=fake.api_key, stripe_api_base=fake.url, stripe_prices=dict(PRICES),
        )
        services = Services.from_settings(settings)
        services.engine.dispose()
        services.engine = clean_db
        app = create_app(settings, services)
        server = _Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "the web server did not start"
            time.sleep(0.02)
        worker = WorkerProcess(settings, tmp_path / "worker", fake, smtp)
        worker.start()
        try:
            yield LiveServer(settings.public_base_url, settings, app), fake, smtp, worker
        finally:
            worker.kill()
            server.should_exit = True
            thread.join(timeout=10)


@pytest.fixture
def browser_page():
    """A Chromium page (desktop size) that may read the clipboard it writes."""
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.set_default_timeout(20_000)
        try:
            yield context, page
        finally:
            context.close()
            browser.close()


def test_the_seed_flow_in_chromium(billed_stack, browser_page):
    """Given the app, a worker, Stripe (the fake: 1 starter seat bought at 10.00 USD, team at 20.00 USD)
    and an IdP, When the admin signs in, creates a tenant with billing, chooses Entra, copies the
    credentials, the IdP pushes users and groups, the admin maps them, reads the preview and saves,
    Then the sync finishes, users have their licenses and invitations, the purchase shows its Stripe
    invoice, the audit log lists every action, and disconnecting stops the IdP's token."""
    server, fake, smtp, worker = billed_stack
    context, page = browser_page
    base = server.url
    fake.add_subscription("sub_acme", customer="cus_acme", items={"price_starter": 1, "price_team": 0})
    if SHOTS.exists():
        shutil.rmtree(SHOTS)
    SHOTS.mkdir(parents=True)
    shots: list[str] = []

    def shot(name: str, full_page: bool = True) -> None:
        """Save a screenshot, after checking that every control on the page has an accessible name."""
        unlabelled = page.evaluate(UNLABELLED)
        assert unlabelled == [], f"controls without a label on {page.url}: {unlabelled}"
        shots.append(name)
        page.screenshot(path=str(SHOTS / f"{len(shots):02d}-{name}.png"), full_page=full_page)

    # 1. Sign in.
    page.goto(base + "/")
    assert page.title().startswith("Sign in")
    shot("sign-in")
    page.get_by_label("Admin token").fill("wrong")
    page.get_by_role("button", name="Sign in").click()
    assert page.get_by_role("alert").inner_text() == "That is not the admin token."
    page.get_by_label("Admin token").fill(ADMIN_TOKEN)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("heading", name="Tenants").wait_for()

    # 2. Create a tenant with Stripe billing linked.
    page.get_by_label("Name").fill("Acme")
    page.get_by_label("Stripe customer id").fill("cus_acme")
    page.get_by_label("Stripe subscription id").fill("sub_acme")
    shot("new-tenant")
    page.get_by_role("button", name="Create tenant").click()
    page.get_by_role("heading", name="Set up SCIM").wait_for()
    tenant_id = page.url.split("/tenants/")[1].split("/")[0]

    # 3. Choose Entra → Tenant URL and Token, shown once, with Entra's steps beside them.
    page.get_by_label("Microsoft Entra (Azure AD)").check()
    shot("choose-idp")
    page.get_by_role("button", name="Set up SCIM").click()
    page.get_by_role("heading", name="Your Tenant URL and Token").wait_for()
    assert "Continue in Microsoft Entra (Azure AD)" in page.content()
    assert "Start provisioning" in page.inner_text("ol.steps")
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=base)
    page.get_by_role("button", name="Copy Tenant URL").click()
    page.get_by_text("Copied Tenant URL.").wait_for()
    tenant_url = page.evaluate("navigator.clipboard.readText()")
    page.get_by_role("button", name="Copy Token").click()
    page.get_by_text("Copied Token.").wait_for()
    token = page.evaluate("navigator.clipboard.readText()")
    assert tenant_url == f"{base}/scim/v2/{tenant_id}"
    assert token == page.get_by_label("Token (Secret Token)").input_value() and len(token) >= 40
    shot("credentials")

    # 4. The IdP pushes users and groups with the copied credentials.
    people = [f"p{i}@acme.example" for i in range(6)]
    with Idp(tenant_url, token) as idp:
        ids = idp.create_users({"user_name": name} for name in people)
        groups = {name: idp.create_group(name) for name in ("Sally Users", "Sally Admins", "Starter", "Team")}
        idp.add_memberships({
            groups["Sally Users"]: ids[:5],  # p5 is in no access group
            groups["Sally Admins"]: ids[:1],
            groups["Starter"]: ids[:2],
            groups["Team"]: ids[1:5],  # p1 is in Starter and Team → starter (lowest wins)
        })
    page.get_by_role("link", name="I have copied them: continue").click()
    page.get_by_role("heading", name="Connected to Microsoft Entra (Azure AD)").wait_for()
    assert "None yet" not in page.inner_text("dl.facts")  # the IdP's last request is shown
    assert "Not syncing" not in page.content()
    shot("connected")

    # 5. Map the groups, preview, save.
    page.get_by_role("link", name="Mapping").click()
    page.get_by_label("Active user group: Sally Users").check()
    page.get_by_label("Admin group: Sally Admins").check()
    page.get_by_label("License for Starter").select_option("starter")
    page.get_by_label("License for Team").select_option("team")
    page.get_by_label("Send each new user an invitation email automatically").check()
    shot("mapping")
    # The worker reads the subscription's seats and prices after billing was linked.
    deadline = time.monotonic() + 30
    while True:
        page.get_by_role("button", name="Preview changes").or_(page.get_by_role("button", name="Update preview")).click()
        preview = page.locator("#preview")
        if "not read yet" not in preview.inner_text():
            break
        assert time.monotonic() < deadline, "the worker did not read the Stripe prices"
        time.sleep(0.5)
    text = preview.inner_text()
    assert "5 user(s) gain access" in " ".join(text.split())
    # 2 starter users with 1 seat bought → 1 to buy at 10.00; 3 team users → 3 at 20.00; 70.00 USD in all.
    assert "Saving buys 4 seat(s) in Stripe at once: 70.00 USD, billed immediately" in text
    assert fake.posts("/v1/subscriptions/sub_acme") == [], "a preview buys nothing"
    shot("preview")
    page.get_by_role("button", name="Save").click()

    # 6. Watch the sync finish: while work is pending the live part refreshes in place (no reload).
    page.wait_for_url(f"**/tenants/{tenant_id}/sync?done=saved")
    page.evaluate("window.stillTheSamePage = true")
    working = page.get_by_role("heading", name="Working…").count() == 1
    if working:
        shot("sync-working")
    page.get_by_role("heading", name="Up to date").wait_for(timeout=60_000)
    if working:
        assert page.evaluate("window.stillTheSamePage === true"), "the sync page reloaded instead of refreshing in place"
    assert page.inner_text("#pending-purchases") == "0" and page.inner_text("#pending-invitations") == "0"
    shot("sync-done")

    # 7. Users: licenses and invitations.
    page.get_by_role("link", name="Users", exact=True).click()
    rows = {row.locator("th").inner_text().split("\n")[0]: row.inner_text() for row in page.locator("tbody tr").all()}
    assert set(rows) == set(people)
    assert "admin" in rows["p0@acme.example"] and "starter" in rows["p0@acme.example"]
    assert "starter" in rows["p1@acme.example"] and "team" not in rows["p1@acme.example"]
    assert "team" in rows["p3@acme.example"] and "Invited" in rows["p3@acme.example"]
    assert "no access" in rows["p5@acme.example"] and "Invited" not in rows["p5@acme.example"]
    assert len(smtp.messages) == 5
    shot("users")
    page.get_by_role("link", name="p1@acme.example").click()
    facts = page.inner_text("dl.facts")
    assert "(tier from Starter)" in facts and "(from Sally Users)" in facts
    history = page.inner_text("ol.history")
    assert "Access as user with a starter license" in history and "Created by the IdP" in history
    assert "Invitation sent to p1@acme.example" in history
    shot("user")

    # 8. Billing: the purchase with its Stripe invoice.
    page.get_by_role("link", name="Billing").click()
    [invoice_id] = list(fake.invoices)
    link = page.get_by_role("link", name=invoice_id)
    assert link.get_attribute("href").endswith(f"/invoices/{invoice_id}")
    purchase_row = page.locator("tbody tr", has=link).inner_text()
    assert "succeeded" in purchase_row and "starter 1 → 2" in purchase_row and "team 0 → 3" in purchase_row
    shot("billing")

    # 9. Disconnect, with a confirmation; users stay, the IdP's token stops working.
    page.get_by_role("link", name="SCIM setup").click()
    page.get_by_role("link", name="Disconnect SCIM…").click()
    page.get_by_role("heading", name="Disconnect SCIM?").wait_for()
    shot("confirm-disconnect")
    page.get_by_role("button", name="Disconnect SCIM").click()
    page.get_by_role("heading", name="Set up SCIM").wait_for()
    assert "SCIM is disconnected" in page.get_by_role("status").first.inner_text()
    assert httpx.get(f"{tenant_url}/Users", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    shot("disconnected")
    # The users stay, with their access and licenses, until removed by hand.
    page.get_by_role("link", name="Users", exact=True).click()
    assert page.locator("tbody tr").count() == 6
    assert "starter" in page.locator("tbody tr", has_text="p0@acme.example").inner_text()

    # 10. The audit log names every action, by the admin's session.
    page.get_by_role("link", name="Audit log").click()
    actions = page.locator("tbody tr td:nth-child(3)").all_inner_texts()
    assert actions == ["SCIM disconnected", "Mapping saved", "SCIM connected", "Billing linked", "Tenant created"]
    saved = page.locator("tbody tr").nth(1).inner_text()
    assert "User groups: Sally Users" in saved and "Admin groups: Sally Admins" in saved and "Team: Team" in saved
    assert token not in page.content()
    shot("audit")

    # 11. Phone width: the user list still reads (no horizontal page scroll).
    page.set_viewport_size({"width": 390, "height": 844})
    page.get_by_role("link", name="Users", exact=True).click()
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
    shot("phone-users")
    page.get_by_role("link", name="Mapping").click()
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
    shot("phone-mapping")

    # Keyboard: the first Tab reaches the skip link, which is visible when focused.
    page.goto(base + "/")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.className") == "skip"
    assert page.evaluate("document.activeElement.getBoundingClientRect().left >= 0")
    assert worker.alive
