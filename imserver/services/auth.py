"""Accounts and tokens: argon2id passwords, random tokens stored as hashes.

Passwords are hashed with argon2id (argon2-cffi) in a worker thread, so a login
never stalls the event loop; a stored hash made with older parameters is
rehashed on the next successful login. Tokens are 256-bit random strings; only
their SHA-256 is stored (a token has full entropy, so a fast hash is enough and
keeps ``auth`` cheap). Tokens expire after ``auth.token_ttl_s`` and are revoked
by ``logout``. Login attempts are rate-limited per user and per address.
Neither tokens nor passwords are ever logged.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets

import argon2
import trio

from protocol.errors import ErrorCode, OpError

from ..clock import Clock
from ..config import AuthSection
from ..hub.ratelimit import RateLimiter
from ..storage.db import Storage
from .token_lookups import TokenLookups

log = logging.getLogger("imserver.auth")

USER_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def token_hash(token: str) -> bytes:
    """The stored form of a token."""
    return hashlib.sha256(token.encode()).digest()


class AuthService:
    """Registration, login, token checks and revocation."""

    def __init__(self, storage: Storage, cfg: AuthSection, clock: Clock) -> None:
        self.storage = storage
        self.cfg = cfg
        self.clock = clock
        self.hasher = argon2.PasswordHasher(
            time_cost=cfg.argon2_time_cost,
            memory_cost=cfg.argon2_memory_kib,
            parallelism=cfg.argon2_parallelism,
            type=argon2.Type.ID,
        )
        self.limiter = RateLimiter(
            {
                "login_user": (cfg.login_per_user_per_min / 60.0, cfg.login_per_user_per_min),
                "login_addr": (cfg.login_per_addr_per_min / 60.0, cfg.login_per_addr_per_min),
            }
        )
        #: Token lookups, batched per round while :meth:`TokenLookups.run` runs.
        self.lookups = TokenLookups(storage)
        # Hashing is CPU-bound; bound how many run at once.
        self._hash_slots = trio.CapacityLimiter(2)
        # A dummy hash to verify against for unknown users (same timing).
        self._dummy_hash = self.hasher.hash(secrets.token_hex(16))

    def _check_login_rate(self, user: str, addr: str) -> None:
        now = trio.current_time()
        host = addr.rsplit(":", 1)[0]  # per address, not per connection (addr is host:port)
        if len(self.limiter.buckets) > 10_000:
            self.limiter.prune(now)  # bounded: full buckets are forgotten
        for kind, key in (("login_addr", host), ("login_user", user)):
            wait = self.limiter.take(kind, key, now)
            if wait:
                raise OpError(
                    ErrorCode.RATE_LIMITED, "too many login attempts", retry_after=round(wait, 3)
                )

    async def register(self, user: str, password: str, addr: str) -> None:
        """Create ``user``.

        Raises:
            OpError: forbidden (registration closed), invalid (weak password),
                conflict (name taken), rate_limited.
        """
        if not self.cfg.open_registration:
            raise OpError(ErrorCode.FORBIDDEN, "registration is closed")
        if user.startswith("wx:") or not USER_RE.fullmatch(user):
            raise OpError(ErrorCode.INVALID, "user: 1-64 of A-Z a-z 0-9 _ . -")
        if len(password) < self.cfg.min_password_len:
            raise OpError(
                ErrorCode.INVALID, f"password: at least {self.cfg.min_password_len} characters"
            )
        self._check_login_rate(user, addr)
        pw_hash = await self._run_hasher(self.hasher.hash, password)
        if not await self.storage.create_user(user, pw_hash):
            raise OpError(ErrorCode.CONFLICT, "user already exists")
        log.info("user_registered user=%s", user)

    async def create_user(self, user: str, password: str) -> bool:
        """Create a user (CLI ``user add``); False if the name is taken."""
        pw_hash = await self._run_hasher(self.hasher.hash, password)
        return await self.storage.create_user(user, pw_hash)

    async def check_password(self, user: str, password: str, addr: str) -> None:
        """Verify a password.

        Raises:
            OpError: unauthorized (bad user or password) or rate_limited.
        """
        self._check_login_rate(user, addr)
        stored = await self.storage.password_hash(user)
        ok = await self._run_hasher(self._verify, stored or self._dummy_hash, password)
        if stored is None or not ok:
            log.info("login_failed user=%s addr=%s", user, addr)
            raise OpError(ErrorCode.UNAUTHORIZED, "bad user or password")
        if self.hasher.check_needs_rehash(stored):
            new = await self._run_hasher(self.hasher.hash, password)
            await self.storage.set_password_hash(user, new)
            log.info("password_rehashed user=%s", user)

    def _verify(self, stored: str, password: str) -> bool:
        try:
            return self.hasher.verify(stored, password)
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            return False

    async def _run_hasher(self, fn, *args):  # type: ignore[no-untyped-def]
        return await trio.to_thread.run_sync(fn, *args, limiter=self._hash_slots)

    async def issue_token(self, user: str, device: str) -> tuple[str, bytes]:
        """A fresh token for ``user``: (token, its hash). Only the hash is stored."""
        token = secrets.token_urlsafe(32)
        h = token_hash(token)
        now = self.clock.now_ms()
        await self.storage.insert_token(h, user, device, now, now + self.cfg.token_ttl_s * 1000)
        return token, h

    async def check_token(self, token: str) -> tuple[str, bytes]:
        """The user a token belongs to, and its hash.

        Raises:
            OpError: unauthorized (unknown, revoked or expired token).
        """
        h = token_hash(token)
        found = await self.lookups.owner(h)
        if found is None:
            raise OpError(ErrorCode.UNAUTHORIZED, "bad token")
        user, expires_ms, revoked = found
        if revoked:
            raise OpError(ErrorCode.UNAUTHORIZED, "token revoked")
        if expires_ms <= self.clock.now_ms():
            raise OpError(ErrorCode.UNAUTHORIZED, "token expired")
        return user, h

    async def revoke(self, h: bytes) -> None:
        """Revoke the token with hash ``h``."""
        await self.storage.revoke_token(h)
