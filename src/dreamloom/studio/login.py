"""The studio's login, for a studio a team shares: one password (kept only as a salted scrypt hash),
a name per visitor, and a gate in front of every route Streamlit serves (pages, the websocket,
uploads, media, static files), so that nothing is reachable by a direct URL without logging in.

The gate is ASGI middleware on Streamlit's own `st.App`; the CLI hashes the password and hands the
server the hash and a per-start signing secret through the environment (never the password)."""

from __future__ import annotations

import asyncio
import base64
import getpass
import hashlib
import hmac
import html
import os
import secrets
import time
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

from ..errors import DreamloomError

HASH_ENV = "DREAMLOOM_LOGIN_HASH"
SECRET_ENV = "DREAMLOOM_STUDIO_SECRET"
PASSWORD_ENV = "DREAMLOOM_PASSWORD"
COOKIE = "dreamloom_session"
LOGIN_PATH, LOGOUT_PATH = "/dreamloom/login", "/dreamloom/logout"
HEALTH_PATH = "/_stcore/health"  # says only "ok": open, for monitors and load balancers
SESSION_SECONDS = 7 * 24 * 3600
SCRYPT = {"n": 2**14, "r": 8, "p": 1}  # OWASP's minimum for scrypt: about 50 ms a check
MAX_DELAY = 30.0  # the longest a failed login waits before its answer


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, **SCRYPT)
    return f"scrypt${salt.hex()}${digest.hex()}"


def password_matches(password: str, stored: str) -> bool:
    try:
        kind, salt, digest = stored.split("$")
    except ValueError:
        return False
    if kind != "scrypt":
        return False
    found = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), **SCRYPT)
    return hmac.compare_digest(found.hex(), digest)


def read_password(password_file: str | None) -> str | None:
    """The team's password, from --password-file or $DREAMLOOM_PASSWORD; None when neither is given."""
    if password_file:
        path = Path(password_file)
        try:
            password = path.read_text().strip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise DreamloomError(f"--password-file {path}: cannot read it ({exc}); give a text file holding the "
                                 "password on its first line.") from None
        where = f"--password-file {path}"
    else:
        password = os.environ.get(PASSWORD_ENV)
        if password is None:
            return None
        where = f"${PASSWORD_ENV}"
    if len(password) < 8:
        raise DreamloomError(f"{where}: the password is shorter than 8 characters; choose a longer one.")
    return password


class Sessions:
    """Signed session tokens: the visitor's name and an expiry, with an HMAC of both."""

    def __init__(self, secret: bytes):
        self.secret = secret

    def _sign(self, text: str) -> str:
        return hmac.new(self.secret, text.encode(), hashlib.sha256).hexdigest()

    def issue(self, name: str, now: float | None = None) -> str:
        body = f"{base64.urlsafe_b64encode(name.encode()).decode()}.{int((now or time.time()) + SESSION_SECONDS)}"
        return f"{body}.{self._sign(body)}"

    def user(self, token: str | None, now: float | None = None) -> str | None:
        """The name a valid, unexpired token was issued to; None otherwise."""
        try:
            name, expiry, signature = (token or "").split(".")
            if not hmac.compare_digest(signature, self._sign(f"{name}.{expiry}")):
                return None
            if int(expiry) < (now or time.time()):
                return None
            return base64.urlsafe_b64decode(name.encode()).decode()
        except (ValueError, UnicodeDecodeError):
            return None


def server_environment(password: str) -> dict[str, str]:
    """What the gated server needs: the password's hash and a fresh signing secret (so that a
    restart of the studio logs everybody out)."""
    return {HASH_ENV: hash_password(password), SECRET_ENV: secrets.token_hex(32)}


def sessions_from_env() -> Sessions | None:
    secret = os.environ.get(SECRET_ENV)
    return Sessions(bytes.fromhex(secret)) if secret else None


def logged_in(cookies) -> str | None:
    """In a page: the logged-in visitor's name (read off Streamlit's request cookies), or None
    when the studio runs without a login."""
    sessions = sessions_from_env()
    return sessions.user(cookies.get(COOKIE)) if sessions else None


def visitor(cookies) -> str:
    """Who submits a job from the studio: the login's name, or this machine's user without a login."""
    return logged_in(cookies) or getpass.getuser()


def _cookie(headers: list[tuple[bytes, bytes]]) -> str | None:
    for key, value in headers:
        if key == b"cookie":
            for part in value.decode("latin-1").split(";"):
                name, _, token = part.strip().partition("=")
                if name == COOKIE:
                    return token
    return None


def _safe_next(target: str | None) -> str:
    """Only a path on this site is followed after logging in (never another host)."""
    if not target or not target.startswith("/") or target.startswith("//") or urlsplit(target).netloc:
        return "/"
    return target


class Throttle:
    """Failed logins slowed down per client address: each failure doubles the wait before the next
    answer (1, 2, 4 ... up to MAX_DELAY seconds); a success clears it."""

    def __init__(self):
        self.failures: dict[str, int] = {}

    def delay(self, client: str) -> float:
        failures = self.failures.get(client, 0)
        return min(2.0 ** (failures - 1), MAX_DELAY) if failures else 0.0

    def failed(self, client: str) -> None:
        self.failures[client] = self.failures.get(client, 0) + 1

    def succeeded(self, client: str) -> None:
        self.failures.pop(client, None)


PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>dreamloom studio: log in</title>
<style>body{{font-family:sans-serif;max-width:22em;margin:5em auto}}input,button{{display:block;width:100%;
margin:.4em 0 1em;padding:.4em;font-size:1em}}.error{{color:#b00}}</style></head><body>
<h1>dreamloom studio</h1><p>This studio is shared: log in to use it.</p>{error}
<form method="post" action="{action}"><input type="hidden" name="next" value="{next}">
<label>Your name<input name="name" autocomplete="username" required maxlength="64"></label>
<label>Password<input name="password" type="password" autocomplete="current-password" required></label>
<button type="submit">Log in</button></form></body></html>"""


class LoginGate:
    """ASGI middleware: every request without a valid session is answered here: pages are sent to
    the login page, anything else (uploads, media, the websocket) is refused."""

    def __init__(self, app, password_hash: str, sessions: Sessions):
        self.app, self.password_hash, self.sessions = app, password_hash, sessions
        self.throttle = Throttle()

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path = scope["path"]
        if scope["type"] == "http" and path == LOGIN_PATH:
            return await self.login(scope, receive, send)
        if scope["type"] == "http" and path == LOGOUT_PATH:
            return await self.respond(send, 303, b"", [(b"location", LOGIN_PATH.encode()),
                                                       (b"set-cookie", f"{COOKIE}=; Path=/; Max-Age=0".encode())])
        if path == HEALTH_PATH or self.sessions.user(_cookie(scope["headers"])) is not None:
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            await receive()  # websocket.connect; closing before accepting answers it with 403
            return await send({"type": "websocket.close", "code": 1008})
        if scope["method"] == "GET" and not path.startswith(("/_stcore/", "/media/", "/component/", "/static/")):
            query = scope.get("query_string", b"").decode()
            target = quote(path + (f"?{query}" if query else ""), safe="")
            return await self.respond(send, 303, b"", [(b"location", f"{LOGIN_PATH}?next={target}".encode())])
        return await self.respond(send, 401, b"log in first: " + LOGIN_PATH.encode() + b"\n",
                                  [(b"content-type", b"text/plain")])

    async def login(self, scope, receive, send):
        client = (scope.get("client") or ("?", 0))[0]
        if scope["method"] == "GET":
            target = parse_qs(scope.get("query_string", b"").decode()).get("next", ["/"])[0]
            return await self.page(send, 200, _safe_next(target), "")
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body") or len(body) > 65536:
                break
        form = {k: v[0] for k, v in parse_qs(body.decode(errors="replace")).items()}
        target, name = _safe_next(form.get("next")), form.get("name", "").strip()[:64]
        await asyncio.sleep(self.throttle.delay(client))  # before the check: guessing stays slow
        if name and password_matches(form.get("password", ""), self.password_hash):
            self.throttle.succeeded(client)
            cookie = f"{COOKIE}={self.sessions.issue(name)}; Path=/; HttpOnly; SameSite=Lax; Max-Age={SESSION_SECONDS}"
            return await self.respond(send, 303, b"", [(b"location", target.encode()), (b"set-cookie", cookie.encode())])
        self.throttle.failed(client)
        error = "give your name" if not name else "wrong password"
        return await self.page(send, 401, target, f'<p class="error">{error}; try again.</p>')

    async def page(self, send, status: int, target: str, error: str):
        text = PAGE.format(error=error, action=LOGIN_PATH, next=html.escape(target, quote=True))
        await self.respond(send, status, text.encode(), [(b"content-type", b"text/html; charset=utf-8")])

    @staticmethod
    async def respond(send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]):
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-length", str(len(body)).encode()), *headers]})
        await send({"type": "http.response.body", "body": body})
