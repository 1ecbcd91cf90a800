"""``imchat``: a terminal client for imserver.

Interactive (``imchat`` or ``imchat chat``): a small full-screen TUI with the
conversation list and unread counts, the open conversation's history and
live messages, typing and presence, an input line. Scriptable::

    imchat send bob "hi"          # prints the committed conv#seq and mid
    imchat tail [CONV]            # prints live messages, one line each
    imchat convs                  # conversations with unread counts
    imchat history CONV|USER      # the last messages of a conversation
    imchat logout                 # revoke and forget the saved token

Credentials: ``--user`` with ``--password`` (or ``IMCHAT_PASSWORD``), which
logs in (``--register`` creates the user) and saves the token in
``~/.config/imchat/<host>_<port>.json`` (mode 0600; ``IMCHAT_CONFIG_DIR``
or ``XDG_CONFIG_HOME`` move it). Later runs use the saved token. The
server: ``--host``, ``--port``, ``--transport tcp|ws``, ``--json`` (JSON
on WebSocket).

Exit status: 0 on success, 1 when the server refused a request or the
connection failed, 2 for usage and credential problems.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import trio

from .client import Client
from .errors import ClientError, Unauthorized
from .fmt import conv_line, message_line, resolve_conv
from .model import Message, Push

__all__ = ["main", "token_path"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """A problem with the command line or the credentials (exit status 2)."""


# --------------------------------------------------------------- credentials


def config_dir() -> Path:
    """Where tokens are kept: ``$IMCHAT_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/imchat``,
    else ``~/.config/imchat``."""
    explicit = os.environ.get("IMCHAT_CONFIG_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "imchat"


def token_path(host: str, port: int) -> Path:
    """The token file for one server."""
    safe = "".join(c if c.isalnum() or c in ".-" else "_" for c in host)
    return config_dir() / f"{safe}_{port}.json"


def load_token(path: Path) -> dict[str, str] | None:
    """The saved ``{"user", "token"}``, or None."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and isinstance(data.get("token"), str):
        return {"user": str(data.get("user", "")), "token": data["token"]}
    return None


def save_token(path: Path, user: str, token: str) -> None:
    """Write the token file with mode 0600 (its directory 0700)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"user": user, "token": token}, f)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


# --------------------------------------------------------------- arguments


def _options(*, defaults: bool) -> argparse.ArgumentParser:
    """The connection and credential options (accepted before or after the command)."""

    def d(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--host", default=d(os.environ.get("IMCHAT_HOST", "127.0.0.1")))
    p.add_argument("--port", type=int, default=d(None), help="default 7700 (tcp) or 7701 (ws)")
    p.add_argument("--transport", choices=("tcp", "ws"), default=d("tcp"))
    p.add_argument(
        "--json", action="store_true", default=d(False), help="JSON, not MessagePack (ws only)"
    )
    p.add_argument("--user", default=d(os.environ.get("IMCHAT_USER")))
    p.add_argument("--password", default=d(None), help="or set IMCHAT_PASSWORD")
    p.add_argument(
        "--register", action="store_true", default=d(False), help="create the user first"
    )
    p.add_argument(
        "--device",
        default=d(None),
        help="device name (default: imchat for the TUI, imchat-tail, imchat-cli otherwise)",
    )
    p.add_argument("--timeout", type=float, default=d(10.0), help="request timeout (s)")
    return p


def build_parser() -> argparse.ArgumentParser:
    """The command line: ``imchat [OPTIONS] [COMMAND] [ARGS]`` (options may follow COMMAND)."""
    p = argparse.ArgumentParser(
        prog="imchat",
        description="A terminal client for imserver.",
        parents=[_options(defaults=True)],
    )
    common = [_options(defaults=False)]
    sub = p.add_subparsers(dest="command")
    sub.add_parser("chat", parents=common, help="the interactive TUI (the default)")
    s = sub.add_parser("send", parents=common, help="send one message")
    s.add_argument("to", help="a user, or a conversation id (d:..., g:...)")
    s.add_argument("text", nargs="+")
    t = sub.add_parser("tail", parents=common, help="print live messages, one line each")
    t.add_argument("conv", nargs="?", help="only this conversation (or user)")
    t.add_argument("--count", type=int, default=None, help="exit after this many")
    t.add_argument("--events", action="store_true", help="also print typing/presence/...")
    sub.add_parser("convs", parents=common, help="conversations with unread counts")
    h = sub.add_parser("history", parents=common, help="the last messages of a conversation")
    h.add_argument("conv", help="a conversation id or a user")
    h.add_argument("--limit", type=int, default=50)
    r = sub.add_parser("read", parents=common, help="mark a conversation read")
    r.add_argument("conv")
    sub.add_parser("logout", parents=common, help="revoke the saved token and forget it")
    return p


# --------------------------------------------------------------- session


def _default_device(command: str | None) -> str:
    # One connection per (user, device): a one-shot command must not replace
    # the TUI or a running tail (PROTOCOL.md §3.5).
    if command in (None, "chat"):
        return "imchat"
    return "imchat-tail" if command == "tail" else "imchat-cli"


@contextlib.asynccontextmanager
async def session(args: argparse.Namespace, *, interactive: bool) -> AsyncIterator[Client]:
    """A logged-in client for ``args``; saves a new token, uses a saved one."""
    port = args.port if args.port is not None else (7700 if args.transport == "tcp" else 7701)
    if args.json and args.transport != "ws":
        raise UsageError("--json needs --transport ws")
    client = Client(
        args.host,
        port,
        transport=args.transport,
        encoding="json" if args.json else "msgpack",
        device=args.device or _default_device(args.command),
        request_timeout=args.timeout,
        send_timeout=max(args.timeout, 30.0),
    )
    path = token_path(args.host, port)
    password = args.password or os.environ.get("IMCHAT_PASSWORD")
    saved = load_token(path)
    if saved is not None and args.user and saved["user"] != args.user:
        saved = None
    if password is None and saved is None:
        if not args.user:
            raise UsageError("no saved session: give --user and --password (or IMCHAT_PASSWORD)")
        if not interactive or not sys.stdin.isatty():
            raise UsageError("no saved session: give --password or set IMCHAT_PASSWORD")
        password = getpass.getpass(f"password for {args.user}: ")
    async with trio.open_nursery() as nursery:
        await client.start(nursery)
        try:
            if password is not None:
                if not args.user:
                    raise UsageError("--password needs --user")
                if args.register:
                    reply = await client.register(args.user, password)
                else:
                    reply = await client.login(args.user, password)
                save_token(path, args.user, str(reply["token"]))
            else:
                assert saved is not None
                try:
                    await client.auth(saved["token"])
                except Unauthorized:
                    raise UsageError(
                        "the saved session has expired: log in again with --password"
                    ) from None
            yield client
        finally:
            await client.aclose()


# --------------------------------------------------------------- commands


def out(line: str) -> None:
    """Print one line and flush (scripts read line by line)."""
    print(line, flush=True)


async def cmd_send(client: Client, args: argparse.Namespace) -> int:
    """``imchat send TO TEXT...``: print ``sent CONV#SEQ mid=MID``."""
    text = " ".join(args.text)
    target = args.to
    if target.startswith(("d:", "g:", "wx:")):
        r = await client.send(conv=target, body=text)
    else:
        r = await client.send(target, text)
    out(f"sent {r.conv}#{r.seq} mid={r.mid}")
    return EXIT_OK


async def cmd_tail(client: Client, args: argparse.Namespace) -> int:
    """``imchat tail [CONV]``: print live messages (and with ``--events`` pushes)."""
    only = resolve_conv(client.user or "", args.conv) if args.conv else None
    seen = 0
    out(f"# tailing as {client.user}" + (f" ({only})" if only else ""))
    async for event in client.events():
        if isinstance(event, Message):
            if only is not None and event.conv != only:
                continue
            out(message_line(event))
            seen += 1
            if args.count is not None and seen >= args.count:
                return EXIT_OK
        elif args.events and isinstance(event, Push):
            fields = {k: v for k, v in event.data.items() if k != "op"}
            out(f"# {event.op} {json.dumps(fields, sort_keys=True)}")
    return EXIT_FAILED


async def cmd_convs(client: Client, args: argparse.Namespace) -> int:
    """``imchat convs``: one tab-separated line per conversation."""
    for entry in await client.sync():
        out(conv_line(client.user or "", entry))
    return EXIT_OK


async def cmd_history(client: Client, args: argparse.Namespace) -> int:
    """``imchat history CONV|USER``: the last ``--limit`` messages."""
    conv = resolve_conv(client.user or "", args.conv)
    page = await client.history(conv, limit=max(1, min(200, args.limit)))
    for m in page.msgs:
        out(message_line(m))
    return EXIT_OK


async def cmd_read(client: Client, args: argparse.Namespace) -> int:
    """``imchat read CONV|USER``: mark everything read."""
    conv = resolve_conv(client.user or "", args.conv)
    page = await client.history(conv, limit=1)
    if page.msgs:
        await client.read(conv, page.msgs[-1].seq)
        out(f"read {conv}#{page.msgs[-1].seq}")
    return EXIT_OK


async def cmd_logout(client: Client, args: argparse.Namespace) -> int:
    """``imchat logout``: revoke the token and delete its file."""
    await client.logout()
    port = client.port
    with contextlib.suppress(FileNotFoundError):
        token_path(args.host, port).unlink()
    out("logged out")
    return EXIT_OK


async def run(args: argparse.Namespace) -> int:
    """Run one command; returns the exit status."""
    command = args.command or "chat"
    interactive = command == "chat"
    async with session(args, interactive=interactive) as client:
        if command == "chat":
            try:
                from .tui import run_tui  # prompt_toolkit is only needed here
            except ImportError as exc:
                raise UsageError(
                    f"the interactive client needs prompt_toolkit>=3.0.50,<3.1 ({exc})"
                ) from None
            return await run_tui(client)
        handler = {
            "send": cmd_send,
            "tail": cmd_tail,
            "convs": cmd_convs,
            "history": cmd_history,
            "read": cmd_read,
            "logout": cmd_logout,
        }[command]
        return await handler(client, args)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``imchat`` command; returns its exit status (see the module docstring)."""
    args = build_parser().parse_args(argv)
    status = EXIT_OK
    try:
        status = trio.run(run, args)
    except* UsageError as group:
        print(f"imchat: {group.exceptions[0]}", file=sys.stderr)
        status = EXIT_USAGE
    except* ClientError as group:
        print(f"imchat: {group.exceptions[0]}", file=sys.stderr)
        status = EXIT_FAILED
    except* KeyboardInterrupt:
        status = 130
    return status


if __name__ == "__main__":
    sys.exit(main())
