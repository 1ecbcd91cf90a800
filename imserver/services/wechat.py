"""WeChat (Gewechat) callbacks: who may post them, and storing their messages.

The gateway signs nothing (PROTOCOL §10), so the per-account secret in the
callback URL (``?token=``) is the authentication, compared in constant time;
a sender that can sign may instead send ``X-Signature: sha256=<hex HMAC-SHA256
of the raw body>`` keyed with the same secret. The secret is checked before
the body is parsed, and the parsed ``Appid`` must belong to an account the
secret admits: an unknown appid or a wrong secret is ``unauthorized`` and
stores nothing.

An ``AddMsg`` is kept whole in ``wechat_events`` once per ``(appid,
NewMsgId)`` and becomes a message of ``wx:<appid>:<peer>`` through the batch
writer, like any message: ``seq`` comes from the commit, the owners' devices
get the push, and the callback is answered only after the commit. A body over
``limits.max_body_bytes`` is cut there, and ``PushContent`` at
:data:`MAX_PUSH_CONTENT_CHARS` (``meta.truncated``), so that every push fits
clients' frame limits; the raw event keeps them whole. Its ``cid``
is ``<appid>:<NewMsgId>`` under the sender ``wx:<wxid>``, so a replay, however
late, is a repeat of the first and delivers nothing again.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from typing import TYPE_CHECKING, Any

import trio

from protocol.errors import ErrorCode, OpError

from ..storage.errors import StorageUnavailable
from ..storage.records import SendRow
from ..wechat import Handshake, Ignored, WeChatMessage, parse_callback

if TYPE_CHECKING:
    from ..state import ServerState

log = logging.getLogger("imserver.wechat")

SIGNATURE_PREFIX = "sha256="
#: ``meta.push_content`` is cut to this many characters (the raw event keeps it).
MAX_PUSH_CONTENT_CHARS = 1024


class CommitWaiter:
    """The reply route of one row submitted from outside a session.

    The writer answers it like a session (``reply``, ``release_inflight``)
    once the row's batch has committed or failed; :meth:`wait` returns that
    answer.
    """

    def __init__(self) -> None:
        self.frame: dict[str, Any] | None = None
        self._done = trio.Event()

    def reply(self, frame: dict[str, Any]) -> None:
        """The writer's answer: ``{"op":"ok",...}`` or an error frame."""
        self.frame = frame
        self._done.set()

    def release_inflight(self) -> None:
        """Nothing to release: no session queue stands behind it."""

    async def wait(self, timeout: float) -> dict[str, Any]:
        """The answer; ``unavailable`` if none came within ``timeout`` seconds.

        Raises:
            OpError: unavailable on a failed batch or no answer in time.
        """
        with trio.move_on_after(timeout):
            await self._done.wait()
        frame = self.frame
        if frame is None:
            raise OpError(ErrorCode.UNAVAILABLE, "commit did not finish in time")
        if frame.get("op") == "error":
            raise OpError(ErrorCode(frame["code"]), frame.get("message", ""))
        return frame


class WeChatService:
    """Configured Gewechat accounts, callback authentication and ingestion."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.accounts: dict[str, dict[str, Any]] = {
            a["appid"]: a for a in state.cfg.wechat.accounts
        }

    async def reconcile(self) -> None:
        """At start: the WeChat conversations' members become exactly the
        configured owners (config is the one source of who sees an account),
        and owners that are not registered users are reported."""
        owners = {appid: self.owners(appid) for appid in self.accounts}
        removed, added = await self.state.storage.reconcile_wechat_owners(owners)
        if removed or added:
            log.info("wechat_owners_reconciled removed=%d added=%d", removed, added)
        named = sorted({o for os in owners.values() for o in os})
        if named:
            known = await self.state.storage.existing_users(named)
            for owner in named:
                if owner not in known:
                    log.warning(
                        "wechat_owner_unregistered user=%s: whoever registers this name "
                        "reads the account's messages; create the user (imserver user add)",
                        owner,
                    )

    def owners(self, appid: str) -> tuple[str, ...]:
        """The local users who see the messages of ``appid`` (none if unknown)."""
        acc = self.accounts.get(appid)
        return tuple(acc["owners"]) if acc is not None else ()

    def may_read(self, user: str, conv: str) -> bool:
        """Whether ``user`` owns the account of the WeChat conversation ``conv``."""
        parts = conv.split(":", 2)
        return len(parts) == 3 and parts[0] == "wx" and user in self.owners(parts[1])

    def may_post(self, token: str | None, signed: bool) -> bool:
        """Before reading a callback's body: a signed one may pass (the body is
        needed to check it), else ``token`` must be some account's secret."""
        if signed:
            return bool(self.accounts)
        given = (token or "").encode("utf-8", "replace")
        ok = False
        for acc in self.accounts.values():
            ok = hmac.compare_digest(given, acc["token"].encode()) or ok
        return ok and bool(token)

    def admitted(self, token: str | None, signature: str | None, body: bytes) -> set[str]:
        """The appids whose secret ``token`` (or the body's ``signature``) proves.

        Every account is checked, each in constant time, whatever matches.
        """
        found: set[str] = set()
        mac_given = b""
        if signature is not None and signature.startswith(SIGNATURE_PREFIX):
            hex_given = signature[len(SIGNATURE_PREFIX) :].strip().lower()
            mac_given = hex_given.encode("ascii", "replace")
        given = (token or "").encode("utf-8", "replace")
        for appid, acc in self.accounts.items():
            secret = acc["token"].encode()
            ok = bool(token) and hmac.compare_digest(given, secret)
            if mac_given:
                mac = hmac.new(secret, body, hashlib.sha256).hexdigest().encode()
                ok = hmac.compare_digest(mac_given, mac) or ok
            if ok:
                found.add(appid)
        return found

    async def callback(self, body: bytes, token: str | None, signature: str | None) -> None:
        """Handle one callback POST; returns once it is stored (or needs no storing).

        Raises:
            OpError: unauthorized (no account admits the secret, or not the
                event's account), too_large, invalid (the message names the
                field), unavailable (storage down or overloaded).
        """
        admitted = self.admitted(token, signature, body)
        if not admitted:
            raise OpError(ErrorCode.UNAUTHORIZED, "bad or missing callback token")
        event = parse_callback(body, max_body_bytes=self.state.cfg.http.max_body_bytes)
        if isinstance(event, Handshake):
            log.info("wechat_handshake accounts=%s", ",".join(sorted(admitted)))
            return
        if isinstance(event, Ignored):
            if event.appid is not None and event.appid not in admitted:
                raise OpError(ErrorCode.UNAUTHORIZED, "token does not belong to this Appid")
            log.info("wechat_event type=%s appid=%s", event.type_name, event.appid)
            return
        assert isinstance(event, WeChatMessage)
        if event.appid not in admitted:
            raise OpError(ErrorCode.UNAUTHORIZED, "token does not belong to this Appid")
        await self._store(event)

    async def _store(self, msg: WeChatMessage) -> None:
        state = self.state
        owners = self.owners(msg.appid)
        # The sender of the first delivery keys the message: a replay that
        # names another sender is still a repeat of the same (sender, cid).
        sender = await state.storage.store_wechat_event(
            msg.appid, msg.new_msg_id, msg.sender, msg.raw, state.clock.now_ms()
        )
        body, meta = self._fit(msg)
        waiter = CommitWaiter()
        row = SendRow(
            sender=sender,
            cid=f"{msg.appid}:{msg.new_msg_id}",
            conv=msg.conv,
            conv_kind="wechat",
            kind=msg.kind,
            body=body,
            meta=meta,
            mentions=None,
            reply_to=None,
            members=owners,
            ref=(waiter, 0),
            own_ts=msg.ts,
        )
        try:
            state.writer.submit_send(row)
        except StorageUnavailable as e:
            raise OpError(ErrorCode.UNAVAILABLE, str(e)) from None
        reply = await waiter.wait(self.commit_wait_s)
        log.info(
            "wechat_message appid=%s conv=%s seq=%s kind=%s repeat=%s",
            msg.appid,
            msg.conv,
            reply.get("seq"),
            msg.kind,
            sender != msg.sender,
        )

    @property
    def commit_wait_s(self) -> float:
        """Longest a callback waits for its commit before answering 503."""
        return self.state.cfg.batch.commit_timeout * 2 + 5

    def _fit(self, msg: WeChatMessage) -> tuple[str, dict[str, Any]]:
        """Body and meta cut to the limits every push and sync entry must fit."""
        lim = self.state.cfg.limits
        body, meta = msg.body, dict(msg.meta)
        if (
            len(body) * 4 > lim.max_body_bytes
            and len(encoded := body.encode()) > lim.max_body_bytes
        ):
            body = encoded[: lim.max_body_bytes].decode("utf-8", "ignore")
            meta["truncated"] = True
        push = meta.get("push_content")
        if isinstance(push, str) and len(push) > MAX_PUSH_CONTENT_CHARS:
            meta["push_content"] = push[:MAX_PUSH_CONTENT_CHARS]
            meta["truncated"] = True
        return body, meta
