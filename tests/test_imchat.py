"""``imchat`` driven in a pseudo-terminal (pexpect) against the real server.

The server runs in-process (the ``server`` fixture); every blocking pexpect
call runs in a worker thread so the server keeps serving meanwhile. The
peer (bob) is a library client inside the test.
"""

from __future__ import annotations

import os
import re
import stat
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from clients import Client
from imserver.app import ServerInfo

from .client_helpers import PASSWORD, Users, open_users

# Test dependencies (pyproject's test extra); skip cleanly where absent.
pexpect = pytest.importorskip("pexpect")

REPO = Path(__file__).resolve().parent.parent


class Imchat:
    """Runs ``python -m clients.imchat`` in a pty with its own config directory."""

    def __init__(self, server: ServerInfo, home: Path) -> None:
        assert server.tcp_port is not None and server.ws_port is not None
        self.tcp_port = server.tcp_port
        self.ws_port = server.ws_port
        self.home = home
        self.log_path = home / "pty.log"
        self.log = open(self.log_path, "a")  # noqa: SIM115 - closed by the fixture
        self.env = {
            k: v for k, v in os.environ.items() if not k.startswith(("IMCHAT_", "IMSERVER_"))
        }
        self.env.update(
            {
                "HOME": str(home),
                "XDG_CONFIG_HOME": str(home / ".config"),
                "TERM": "xterm",
                "PYTHONPATH": str(REPO),
            }
        )

    def spawn(self, *args: str, port: int | None = None, **env: str) -> pexpect.spawn:
        argv = ["-m", "clients.imchat", "--port", str(port or self.tcp_port), *args]
        child = pexpect.spawn(
            sys.executable,
            argv,
            env={**self.env, **env},
            cwd=str(REPO),
            encoding="utf-8",
            timeout=20,
            dimensions=(30, 120),
        )
        child.logfile_read = self.log  # everything shown, for failure messages
        return child

    async def run(self, *args: str, port: int | None = None, **env: str) -> tuple[int, str]:
        """Run a command to the end; its exit status and output."""

        def go() -> tuple[int, str]:
            child = self.spawn(*args, port=port, **env)
            child.expect(pexpect.EOF)
            child.close()
            assert child.exitstatus is not None, child.signalstatus
            return child.exitstatus, child.before.replace("\r\n", "\n")

        return await trio.to_thread.run_sync(go)

    async def expect(self, child: pexpect.spawn, pattern: str) -> str:
        """Wait (in a thread) for ``pattern`` (a regex) in the child's output."""
        try:
            await trio.to_thread.run_sync(child.expect, pattern)
        except pexpect.TIMEOUT:
            self.log.flush()
            shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", " ", self.log_path.read_text())
            raise AssertionError(
                f"{pattern!r} not shown; the terminal's end:\n{shown[-1500:]}"
            ) from None
        after = child.after
        return after if isinstance(after, str) else ""


@pytest.fixture
def chat(server: ServerInfo, tmp_path: Path) -> Iterator[Imchat]:
    runner = Imchat(server, tmp_path)
    try:
        yield runner
    finally:
        runner.log.close()


@pytest.fixture
async def bob_and_users(server: ServerInfo) -> AsyncIterator[tuple[Users, Client]]:
    async with open_users(server, ("tcp", "msgpack")) as users:
        bob = await users.open("bob")
        yield users, bob


async def befriend_alice(users: Users, bob: Client) -> None:
    alice = await users.open("alice", register=False, device="lib", record=False)
    assert await alice.friend_request("bob") == "requested"
    assert await bob.friend_accept("alice") == "accepted"
    await alice.aclose()


async def test_scriptable_commands(
    chat: Imchat, bob_and_users: tuple[Users, Client], tmp_path: Path
) -> None:
    users, bob = bob_and_users
    rb = users.rec(bob)
    with trio.fail_after(90):
        # No credentials at all: a usage error.
        status, out = await chat.run("convs")
        assert status == 2, out
        assert "no saved session" in out

        # Register with a password from the environment; the token is saved 0600.
        status, out = await chat.run(
            "--user", "alice", "--register", "convs", IMCHAT_PASSWORD=PASSWORD
        )
        assert (status, out.strip()) == (0, ""), out
        [token_file] = (tmp_path / ".config" / "imchat").iterdir()
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert token_file.name == f"127.0.0.1_{chat.tcp_port}.json"

        # Not friends yet: the server's refusal, exit status 1.
        status, out = await chat.run("send", "bob", "too early")
        assert status == 1, out
        assert "forbidden" in out
        await befriend_alice(users, bob)

        # send, with the saved token.
        status, out = await chat.run("send", "bob", "hi", "bob")
        assert status == 0, out
        assert out.strip().startswith("sent d:alice:bob#1 mid=")
        m = await rb.message("d:alice:bob", 1)
        assert (m.sender, m.body) == ("alice", "hi bob")

        # convs: unread counts bob's messages only.
        await bob.send("alice", "hello alice")
        status, out = await chat.run("convs")
        assert status == 0, out
        [line] = out.strip().splitlines()
        assert line.split("\t")[:3] == ["d:alice:bob", "bob", "unread=1"]
        assert line.endswith("bob: hello alice")

        # history, by user name, over WebSocket with JSON (logging in again;
        # options may also follow the command).
        status, out = await chat.run(
            "--transport",
            "ws",
            "--json",
            "history",
            "bob",
            "--user",
            "alice",
            "--password",
            PASSWORD,
            port=chat.ws_port,
        )
        assert status == 0, out
        lines = out.strip().splitlines()
        assert [ln.split(" ", 1)[1] for ln in lines] == [
            "d:alice:bob#1 alice: hi bob",
            "d:alice:bob#2 bob: hello alice",
        ]

        # read marks it read: bob gets the receipt, convs shows unread=0.
        status, out = await chat.run("read", "bob")
        assert (status, out.strip()) == (0, "read d:alice:bob#2")
        await rb.push("receipt", conv="d:alice:bob", user="alice", read=2)

        # tail prints live messages as lines, and stops after --count.
        child = chat.spawn("tail", "--count", "2")
        await chat.expect(child, "# tailing as alice")
        await bob.send("alice", "live one")
        await bob.send("alice", "live two")
        await chat.expect(child, r"d:alice:bob#3 bob: live one\r\n")
        await chat.expect(child, r"d:alice:bob#4 bob: live two\r\n")
        await trio.to_thread.run_sync(child.expect, pexpect.EOF)
        child.close()
        assert child.exitstatus == 0

        # A wrong password is refused; the saved token is left alone.
        status, out = await chat.run("--user", "alice", "--password", "wrong-one", "convs")
        assert status == 1 and "unauthorized" in out, out

        # logout revokes the token and forgets it.
        status, out = await chat.run("logout")
        assert (status, out.strip()) == (0, "logged out")
        assert not token_file.exists()


async def test_interactive_chat(
    chat: Imchat, bob_and_users: tuple[Users, Client], tmp_path: Path
) -> None:
    pytest.importorskip("prompt_toolkit")  # the TUI's own dependency
    users, bob = bob_and_users
    rb = users.rec(bob)
    conv = "d:alice:bob"
    with trio.fail_after(90):
        status, out = await chat.run(
            "--user", "alice", "--password", PASSWORD, "--register", "convs"
        )
        assert status == 0, out
        await befriend_alice(users, bob)
        await bob.send("alice", "hello alice")

        child = chat.spawn()  # the TUI, with the saved token
        try:
            await chat.expect(child, r"alice \(online\)")
            await chat.expect(child, r"bob.*\[1\]")  # one unread message
            child.send("/open bob\r")
            await chat.expect(child, "hello alice")
            # Opening it marked it read.
            await rb.push("receipt", conv=conv, user="alice", read=1)

            # Typing shows up on both sides.
            await bob.typing("alice", on=True)
            await chat.expect(child, "bob is typing")
            child.send("hi bob, how are you")
            await rb.push("typing", conv=conv, user="alice", on=True)
            child.send("\r")
            mine = await rb.message(conv, 2)
            assert (mine.sender, mine.body) == ("alice", "hi bob, how are you")
            await chat.expect(child, "alice: hi bob, how are you")

            # The peer's reply arrives live and is marked read at once.
            await bob.send("alice", "fine, thanks")
            await chat.expect(child, "bob: fine, thanks")
            await rb.push("receipt", conv=conv, user="alice", read=3)

            # Presence of a friend, in the list: "bob (online)" becomes "bob (away)".
            # (The screen is redrawn by difference: only the changed cells.)
            await bob.presence("away")
            await chat.expect(child, r"away\)")

            child.send("/quit\r")
            await trio.to_thread.run_sync(child.expect, pexpect.EOF)
            child.close()
            assert child.exitstatus == 0
        finally:
            if child.isalive():
                child.terminate(force=True)
        # Exactly the three messages, in order, for both.
        h = await bob.history(conv)
        assert [(m.seq, m.sender) for m in h.msgs] == [(1, "bob"), (2, "alice"), (3, "bob")]
