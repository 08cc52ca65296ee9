"""The admin page's session and CSRF (issue 10): signed HttpOnly SameSite=Strict cookie, one CSRF token per session."""

from __future__ import annotations

import time
import uuid
from dataclasses import replace

from api.web.session import COOKIE, SessionCodec, WebSession
from models.settings import Settings
from tests.api.helpers import count_rows
from tests.api.web.conftest import csrf_of, make_client, sign_in
from tests.conftest import ADMIN_TOKEN


def test_signed_out_root_is_the_sign_in_page_with_a_strict_httponly_cookie(page):
    """GET / never 404s: signed out it is the sign-in form; the cookie is HttpOnly and SameSite=Strict,
    not Secure on http, and the page is neither cached nor frameable."""
    response = page.get("/")
    assert response.status_code == 200
    assert 'action="/login"' in response.text and 'type="password"' in response.text
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Secure" not in cookie
    assert response.headers["cache-control"] == "no-store"
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]


def test_the_cookie_is_secure_behind_https(base_settings, clean_db):
    with make_client(replace(base_settings, public_base_url="https://sally.example"), clean_db) as client:
        assert "Secure" in client.get("/").headers["set-cookie"]


def test_a_wrong_token_does_not_sign_in(page):
    response = page.post("/login", data={"token": "not-it", "csrf": csrf_of(page.get("/").text)})
    assert response.status_code == 401
    assert "That is not the admin token." in response.text
    assert page.get("/tenants/x/scim").status_code == 303  # still signed out


def test_sign_in_needs_the_csrf_token_and_gives_a_new_one(page):
    """A sign-in without the session's CSRF token is refused (login CSRF); a good one starts a
    new session with a new CSRF token, so a token planted before sign-in is worthless."""
    before = csrf_of(page.get("/").text)
    assert page.post("/login", data={"token": ADMIN_TOKEN}).status_code == 400
    assert page.post("/login", data={"token": ADMIN_TOKEN, "csrf": "forged"}).status_code == 400
    after = sign_in(page)
    assert after != before
    assert "New tenant" in page.get("/").text


def test_every_post_checks_the_csrf_token_and_changes_nothing_without_it(page, clean_db):
    csrf = sign_in(page)
    for data in ({"name": "Acme"}, {"name": "Acme", "csrf": "wrong"}, {"name": "Acme", "csrf": csrf + "x"}):
        response = page.post("/tenants", data=data)
        assert response.status_code == 400, data
        assert "Reload the page" in response.text
    assert count_rows(clean_db, "tenant") == 0
    assert page.post("/tenants", data={"name": "Acme", "csrf": csrf}).status_code == 303
    assert count_rows(clean_db, "tenant") == 1


def test_a_post_from_a_browser_without_our_cookie_is_refused(page, base_settings, clean_db):
    """A cross-site form post carries no SameSite=Strict cookie: refused even with a token copied from a page."""
    csrf = sign_in(page)
    with make_client(base_settings, clean_db) as stranger:
        assert stranger.post("/tenants", data={"name": "Evil", "csrf": csrf}).status_code == 400
    assert count_rows(clean_db, "tenant") == 0


def test_a_tampered_or_expired_cookie_is_a_signed_out_session(page, base_settings):
    sign_in(page)
    value = page.cookies[COOKIE]
    payload, signature = value.split(".")
    page.cookies.clear()
    page.cookies.set(COOKIE, payload + "." + signature[:-2] + ("AA" if not signature.endswith("AA") else "BB"))
    assert page.get("/tenants/x/users").status_code == 303
    codec = SessionCodec(ADMIN_TOKEN, 3600)
    assert codec.loads(codec.dumps(WebSession.fresh(-1, signed_in=True))) is None
    assert codec.loads(codec.dumps(WebSession.fresh(60, signed_in=True))).signed_in is True
    # Another admin token (rotated) signs everyone out.
    assert SessionCodec("another-token", 3600).loads(codec.dumps(WebSession.fresh(60, signed_in=True))) is None
    assert "another-token" not in repr(SessionCodec("another-token", 3600))


def test_sign_out(page):
    csrf = sign_in(page)
    # A GET (a link, a prefetch) neither signs in nor out: it leads to the page.
    assert page.get("/logout").status_code == 303 and "New tenant" in page.get("/").text
    assert page.get("/login").headers["location"] == "/"
    response = page.post("/logout", data={"csrf": csrf})
    assert response.status_code == 303
    assert page.get("/tenants/x/audit").status_code == 303
    assert 'action="/login"' in page.get("/").text


def test_pages_need_sign_in(page):
    for path in ("/tenants/x/scim", "/tenants/x/mapping", "/tenants/x/users", "/tenants/x/users/y",
                 "/tenants/x/billing", "/tenants/x/sync", "/tenants/x/audit"):
        response = page.get(path)
        assert response.status_code == 303 and response.headers["location"] == "/", path


def test_an_oversized_form_is_413_and_an_unknown_tenant_404(page):
    csrf = sign_in(page)
    response = page.post("/tenants", content=b"csrf=" + csrf.encode() + b"&name=" + b"x" * 300_000,
                         headers={"content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 413
    assert page.get("/tenants/nope/scim").status_code == 404


def _not_at_the_end_of_a_minute() -> None:
    """The throttle counts per wall-clock minute: start a test of it with the minute's count still to come."""
    left = 60 - time.time() % 60
    if left < 10:
        time.sleep(left + 0.1)


def test_failed_sign_ins_are_throttled_per_address(base_settings, clean_db):
    """Given WEB_SIGNIN_FAILURE_LIMIT=3, When one address signs in with a wrong token five times within a
    minute, Then three are 401 and the rest 429 with Retry-After and the reason on the page; the right token
    from that address is refused too until the minute ends (its tries are not even checked), and no session
    was signed in; Then another address still signs in."""
    settings = replace(base_settings, web_signin_failure_limit=3,
                       redis_namespace=base_settings.redis_namespace + f"si{uuid.uuid4().hex[:6]}")
    _not_at_the_end_of_a_minute()
    with make_client(settings, clean_db, redis_url=settings.redis_url, client=("203.0.113.7", 50000)) as guesser:
        csrf = csrf_of(guesser.get("/").text)
        wrong = [guesser.post("/login", data={"token": f"wrong-{i}", "csrf": csrf}) for i in range(5)]
        right = guesser.post("/login", data={"token": ADMIN_TOKEN, "csrf": csrf})
        still_signed_out = guesser.get("/")
    assert [r.status_code for r in wrong] == [401, 401, 401, 429, 429]
    assert 1 <= int(wrong[-1].headers["Retry-After"]) <= 60
    assert "Too many failed sign-ins from this address" in wrong[-1].text
    assert right.status_code == 429 and "location" not in right.headers
    assert 'action="/login"' in still_signed_out.text
    with make_client(settings, clean_db, redis_url=settings.redis_url, client=("198.51.100.9", 50000)) as admin:
        sign_in(admin)


def test_the_sign_in_throttle_is_a_setting_with_a_default():
    """WEB_SIGNIN_FAILURE_LIMIT: 10 failed sign-ins per address and minute unless set; 0 turns it off."""
    assert Settings.from_env({}).web_signin_failure_limit == 10
    assert Settings.from_env({"WEB_SIGNIN_FAILURE_LIMIT": "0"}).web_signin_failure_limit == 0
