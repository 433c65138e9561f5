"""The shared studio's login gate, in-process in front of a stand-in app (the real Streamlit server
behind it is covered by the browser test): sessions cannot be forged or outlive their expiry, the
password is kept only as a salted hash, failed logins are slowed down."""

from __future__ import annotations

import time

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from dreamloom.studio.login import (COOKIE, LOGIN_PATH, SESSION_SECONDS, LoginGate, Sessions, hash_password,
                                    password_matches)

PASSWORD = "team-secret-42"


def gated_client() -> tuple[TestClient, Sessions]:
    sessions = Sessions(b"k" * 32)
    inner = Starlette(routes=[Route("/", lambda request: PlainTextResponse("the studio"))],
                      middleware=[Middleware(LoginGate, password_hash=hash_password(PASSWORD), sessions=sessions)])
    return TestClient(inner, follow_redirects=False), sessions


def log_in(client, password: str, name: str = "ann"):
    return client.post(LOGIN_PATH, data={"name": name, "password": password, "next": "/"})


def test_the_password_is_kept_only_as_a_salted_hash():
    first, second = hash_password(PASSWORD), hash_password(PASSWORD)
    assert PASSWORD not in first and first != second  # a new salt each time
    assert password_matches(PASSWORD, first) and password_matches(PASSWORD, second)
    assert not password_matches(PASSWORD + "x", first)


def test_a_session_cannot_be_forged_or_outlive_its_expiry():
    client, sessions = gated_client()
    token = sessions.issue("ann")
    assert client.get("/", cookies={COOKIE: token}).text == "the studio"
    name, expiry, signature = token.split(".")
    forged = sessions.issue("bob").split(".")[0]  # another name under ann's signature
    for bad in (f"{forged}.{expiry}.{signature}", f"{name}.{int(expiry) + 10**6}.{signature}", "garbage"):
        assert client.get("/", cookies={COOKIE: bad}).status_code == 303
    assert sessions.user(token, now=time.time() + SESSION_SECONDS + 1) is None


def test_failed_logins_are_slowed_down_and_the_password_still_lets_in():
    client, _ = gated_client()
    waits = []
    for _ in range(3):
        started = time.monotonic()
        assert log_in(client, "wrong password").status_code == 401
        waits.append(time.monotonic() - started)
    assert waits[1] >= 1.0 and waits[2] >= 2.0  # each failure doubles the wait before the next answer
    answer = log_in(client, PASSWORD)
    assert answer.status_code == 303 and answer.headers["location"] == "/" and COOKIE in answer.headers["set-cookie"]


def test_after_logging_in_only_a_path_of_this_site_is_followed():
    client, _ = gated_client()
    for target in ("https://elsewhere.example/", "//elsewhere.example/x"):
        answer = client.post(LOGIN_PATH, data={"name": "ann", "password": PASSWORD, "next": target})
        assert answer.headers["location"] == "/"
