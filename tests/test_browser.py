"""End to end: the browser client (clients/web) in real headless Chromium.

Two Chromium instances (alice on MessagePack, bob on JSON text frames),
driven by Selenium with Debian's chromium and its version-matched
chromedriver, load the page from the HTTP shim (which tells them the WebSocket
port at /api/v1/info) and talk to the real server and to a Python client
(carol, tests/client.py, over TCP). Through what the pages show, it proves:

- register and log in from the form, friend request and accept in the page,
  presence of friends (online, then offline when carol disconnects);
- messages both ways between the two pages and between a page and carol, with
  user text shown as text (an HTML-looking body stays literal);
- typing indicators (page to page, and from carol), read receipts ("read" on
  the sender's own message once the other page has it open; carol receives
  the ``receipt`` push), unread counts in the conversation list;
- a server restart: the status shows the ``shutdown`` kick and "Reconnecting
  in N s", a message written while offline waits as "sending…"; after the
  restart the pages are online again, the offline message is delivered once,
  and a message carol sent while the page was away is filled in;
- a send whose connection drops before its reply is re-sent with its original
  ``cid`` and shows exactly once on both sides;
- a ``replaced`` kick is shown and not fought back automatically;
- after a reload (the session survives in sessionStorage), history pages in
  on demand; a connection that goes silent (a proxy swallows its bytes, no
  close) is given up on pong timeout, and the push lost in it is filled in
  with ``history``;
- after logout and a password login the conversation list comes from sync.

Selenium's blocking calls run in worker threads (``trio.to_thread``) while the
server runs in the test's Trio loop. Screenshots go to
``$IMSERVER_TEST_ARTIFACTS`` (default ``test-artifacts/`` in the repo).

Without chromium, chromedriver or selenium the test is skipped, or fails when
``CI`` is set (scripts/install-browser-deps installs the first two).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from .client import TestClient
from .conftest import running_server, test_config

REPO = Path(__file__).resolve().parent.parent
WEB_DIR = REPO / "clients" / "web"
PASSWORD = "password1"
WAIT_S = 15.0


def _missing(what: str) -> None:
    msg = f"browser test needs {what}; run scripts/install-browser-deps (as root)"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


def _which(env: str, *names: str) -> str | None:
    """``$env`` if it names an executable, else the first of ``names`` on PATH."""
    override = os.environ.get(env)
    if override:
        return override if os.access(override, os.X_OK) else None
    return next((p for n in names if (p := shutil.which(n))), None)


@pytest.fixture(scope="session")
def browser_paths() -> tuple[str, str]:
    """Chromium and chromedriver, checked before the database starts."""
    chromium = _which("IMSERVER_CHROMIUM", "chromium", "chromium-browser")
    driver = _which("IMSERVER_CHROMEDRIVER", "chromedriver")
    if not chromium:
        _missing("Debian's chromium (apt-get install chromium)")
    if not driver:
        _missing("chromedriver (apt-get install chromium-driver)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        _missing("selenium (pip install 'selenium>=4.30,<5')")
    assert chromium and driver
    return chromium, driver


def _artifacts() -> Path:
    path = Path(os.environ.get("IMSERVER_TEST_ARTIFACTS") or REPO / "test-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


# -- one browser page ---------------------------------------------------------

_MESSAGES_JS = """
return Array.from(document.querySelectorAll('#message-list .msg')).map(li => ({
  seq: li.dataset.seq ? Number(li.dataset.seq) : null,
  cid: li.dataset.cid || null,
  body: (li.querySelector('.body') || {}).textContent || '',
  status: (li.querySelector('.msg-status') || {}).textContent || '',
  own: li.classList.contains('own'),
  pending: li.classList.contains('pending'),
  html_children: li.querySelector('.body') ? li.querySelector('.body').children.length : 0,
}));
"""

_CONVS_JS = """
return Array.from(document.querySelectorAll('#conv-list li')).map(li => ({
  conv: li.dataset.conv,
  title: li.querySelector('.title').textContent,
  last: li.querySelector('.last').textContent,
  unread: li.querySelector('.unread') ? Number(li.querySelector('.unread').textContent) : 0,
}));
"""

_FRIENDS_JS = """
return Object.fromEntries(Array.from(document.querySelectorAll('#friend-list li.friend'))
  .map(li => [li.dataset.user, li.querySelector('.presence').textContent]));
"""


class Page:
    """A headless Chromium with the client page; blocking calls (run in a thread)."""

    def __init__(self, name: str, chromium: str, driver_path: str, profile: Path) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.name = name
        opts = webdriver.ChromeOptions()
        opts.binary_location = chromium
        for arg in (
            "--headless=new",
            "--no-sandbox",
            "--disable-dev-shm-usage",
            "--disable-gpu",
            "--window-size=1100,720",
            f"--user-data-dir={profile}",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--disable-extensions",
            "--disable-features=Translate,MediaRouter,OptimizationHints",
            "--disable-background-timer-throttling",
            "--disable-renderer-backgrounding",
            "--disable-backgrounding-occluded-windows",
            "--proxy-server=direct://",
            "--proxy-bypass-list=*",
        ):
            opts.add_argument(arg)
        self.driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
        self.driver.set_page_load_timeout(WAIT_S)

    def quit(self) -> None:
        with contextlib.suppress(Exception):
            self.driver.quit()

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def screenshot(self, label: str) -> Path:
        path = _artifacts() / f"browser-{self.name}-{label}.png"
        self.driver.save_screenshot(str(path))
        return path

    def wait(self, what: str, cond: Callable[[], Any], timeout: float = WAIT_S) -> Any:
        """Poll ``cond`` until it returns something truthy; fail with ``what``."""
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(lambda _d: cond())
        except TimeoutException:
            shot = self.screenshot("failure")
            raise AssertionError(
                f"{self.name}: timed out waiting for {what}; status={self.status()!r}; "
                f"screenshot {shot}"
            ) from None

    # -- what the page shows --

    def status(self) -> list[str]:
        """[state, text] of the connection status in the top bar."""
        state: list[str] = self.js(
            "const s = document.getElementById('status');"
            "return [s.dataset.state, document.getElementById('status-text').textContent];"
        )
        return state

    def text(self, element_id: str) -> str:
        text: str = self.js(f"return document.getElementById('{element_id}').textContent;")
        return text

    def messages(self) -> list[dict[str, Any]]:
        msgs: list[dict[str, Any]] = self.js(_MESSAGES_JS)
        return msgs

    def convs(self) -> list[dict[str, Any]]:
        convs: list[dict[str, Any]] = self.js(_CONVS_JS)
        return convs

    def friends(self) -> dict[str, str]:
        friends: dict[str, str] = self.js(_FRIENDS_JS)
        return friends

    def wait_status(self, state: str, timeout: float = WAIT_S) -> list[str]:
        got: list[str] = self.wait(
            f"status {state}", lambda: (s := self.status())[0] == state and s, timeout
        )
        return got

    def wait_message(self, body: str, **expect: Any) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            for m in self.messages():
                if m["body"] == body and all(m[k] == v for k, v in expect.items()):
                    return m
            return None

        msg: dict[str, Any] = self.wait(f"message {body!r} {expect}", found)
        return msg

    def no_duplicates(self) -> list[dict[str, Any]]:
        msgs = self.messages()
        seqs = [m["seq"] for m in msgs if m["seq"] is not None]
        bodies = [m["body"] for m in msgs]
        assert len(seqs) == len(set(seqs)), (self.name, msgs)
        assert len(bodies) == len(set(bodies)), (self.name, msgs)
        assert seqs == sorted(seqs), (self.name, msgs)
        return msgs

    # -- what the user does --

    def navigate(self, url: str) -> None:
        """Load another URL in this tab (sessionStorage, hence the session, stays)."""
        self.driver.get(url)
        self.wait("the client script", lambda: self.js("return !!window.imClient"))

    def load(self, url: str) -> None:
        self.driver.get(url)
        self.wait("login form", lambda: self.js("return !!document.getElementById('login-form')"))

    def sign_in(self, user: str, *, register: bool = True) -> None:
        """Fill in the login form and press Register (or Log in)."""
        from selenium.webdriver.common.by import By

        d = self.driver
        for field, value in (("login-user", user), ("login-password", PASSWORD)):
            d.find_element(By.ID, field).clear()
            d.find_element(By.ID, field).send_keys(value)
        d.find_element(By.ID, "btn-register" if register else "btn-login").click()
        self.wait_status("online")
        self.wait(
            "the app view", lambda: self.js("return !document.getElementById('app-view').hidden")
        )

    def click(self, css: str) -> None:
        from selenium.webdriver.common.by import By

        self.wait(f"clickable {css}", lambda: self.driver.find_elements(By.CSS_SELECTOR, css))
        self.driver.find_element(By.CSS_SELECTOR, css).click()

    def add_friend(self, user: str) -> None:
        from selenium.webdriver.common.by import By

        self.driver.find_element(By.ID, "add-friend-input").send_keys(user)
        self.driver.find_element(By.ID, "add-friend-btn").click()

    def open_conv(self, conv: str) -> None:
        self.click(f'#conv-list li[data-conv="{conv}"]')
        self.wait(f"{conv} open", lambda: self.js("return window.imClient.state.open") == conv)

    def open_friend(self, user: str) -> None:
        self.click(f'#friend-list li[data-user="{user}"]')
        self.wait(f"chat with {user}", lambda: self.text("chat-title") == user)

    def type(self, text: str) -> None:
        from selenium.webdriver.common.by import By

        self.driver.find_element(By.ID, "composer-input").send_keys(text)

    def submit(self) -> None:
        from selenium.webdriver.common.by import By

        self.driver.find_element(By.ID, "send-btn").click()

    def say(self, text: str) -> None:
        self.type(text)
        self.submit()


class SilentProxy:
    """A TCP proxy to the WebSocket port whose connections can go silent.

    After :meth:`cut`, bytes of the connections open then (and of any opened
    until :meth:`restore`) are swallowed both ways, with no close: a dead
    network path that only the client's ping/pong can notice.
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.holding = False
        self.conns: list[dict[str, bool]] = []

    async def serve(self, task_status: trio.TaskStatus[SilentProxy]) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._handle, listeners)

    def cut(self) -> None:
        self.holding = True
        for conn in self.conns:
            conn["cut"] = True

    def restore(self) -> None:
        self.holding = False

    async def _handle(self, client: trio.SocketStream) -> None:
        conn = {"cut": self.holding}
        self.conns.append(conn)
        async with client:
            if conn["cut"]:
                await self._pump(client, None, conn)
                return
            upstream = await trio.open_tcp_stream("127.0.0.1", self.target)
            async with upstream, trio.open_nursery() as nursery:
                for src, dst in ((client, upstream), (upstream, client)):
                    nursery.start_soon(self._pump, src, dst, conn, nursery.cancel_scope)

    @staticmethod
    async def _pump(
        src: trio.SocketStream,
        dst: trio.SocketStream | None,
        conn: dict[str, bool],
        done: trio.CancelScope | None = None,
    ) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while data := await src.receive_some(65536):
                if dst is not None and not conn["cut"]:
                    await dst.send_all(data)
        if done is not None:
            done.cancel()  # one side closed: close both


async def run(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


@contextlib.asynccontextmanager
async def browsers(paths: tuple[str, str], *names: str) -> AsyncIterator[list[Page]]:
    chromium, driver = paths
    with tempfile.TemporaryDirectory(prefix="imserver-chromium-") as tmp:
        pages: list[Page] = []

        async def start(name: str) -> None:
            profile = Path(tmp) / name
            pages.append(await run(Page, name, chromium, driver, profile))

        try:
            async with trio.open_nursery() as nursery:
                for name in names:
                    nursery.start_soon(start, name)
            pages.sort(key=lambda p: names.index(p.name))
            yield pages
        finally:
            with trio.CancelScope(shield=True):
                for p in pages:
                    await run(p.quit)


async def next_push(client: TestClient, op: str, **match: Any) -> dict[str, Any]:
    """The next ``op`` push of ``client`` whose fields include ``match``."""
    with trio.fail_after(WAIT_S):
        while True:
            f = await client.push(op)
            if all(f.get(k) == v for k, v in match.items()):
                return f


# -- the test -----------------------------------------------------------------


async def test_browser_chat_end_to_end(browser_paths: tuple[str, str], db_dsn: str) -> None:
    alice_bob = "d:alice:bob"
    alice_carol = "d:alice:carol"
    # A short grace: the restart below then fits in the page's 2 s back-off.
    cfg = test_config(server={"shutdown_grace": 0.5})
    async with browsers(browser_paths, "alice", "bob") as (alice, bob):
        async with running_server(cfg, db_dsn) as info:
            assert info.tcp_port and info.ws_port and info.http_port
            ports = {"tcp": info.tcp_port, "websocket": info.ws_port, "http": info.http_port}
            # The HTTP shim serves the page at /, and /api/v1/info tells it the WebSocket port.
            url = f"http://127.0.0.1:{info.http_port}/"
            await run(alice.load, url)
            await run(bob.load, url + "?encoding=json")  # bob speaks JSON text frames
            await run(alice.screenshot, "login")
            assert (await run(alice.status))[0] == "offline"
            ws_url = f"ws://127.0.0.1:{info.ws_port}{cfg.websocket.path}"
            await run(
                alice.wait, "ws url", lambda: alice.js("return imClient.state.wsUrl") == ws_url
            )
            await run(alice.sign_in, "alice")
            await run(bob.sign_in, "bob")
            assert await run(bob.js, "return window.imClient.state.json") is True

            carol = await TestClient.tcp(info.tcp_port)
            await carol.login("carol")

            # Friends: alice asks bob in the page, bob accepts in his page;
            # carol (Python) asks alice, alice accepts in the page.
            await run(alice.add_friend, "bob")
            await run(bob.click, '#request-list li[data-user="alice"] button.accept')
            await run(alice.wait, "bob online", lambda: alice.friends().get("bob") == "online")
            await run(bob.wait, "alice online", lambda: bob.friends().get("alice") == "online")
            await carol.ok("friend_request", to="alice", note="hi from python")
            await run(alice.click, '#request-list li[data-user="carol"] button.accept')
            await next_push(carol, "friend", event="accepted", user="alice")
            await run(alice.wait, "carol online", lambda: alice.friends().get("carol") == "online")

            # Page to page: typing, then a message whose text looks like HTML.
            await run(bob.open_friend, "alice")
            await run(alice.open_friend, "bob")
            await run(alice.type, "Hello Bob")
            await run(bob.wait, "typing", lambda: bob.text("typing") == "alice is typing…")
            tricky = "Hello Bob <b>bold</b> &amp; <img src=x onerror=alert(1)>"
            await run(alice.type, tricky[len("Hello Bob") :])
            await run(alice.submit)
            got = await run(bob.wait_message, tricky, own=False)
            assert got["html_children"] == 0 and got["seq"] == 1
            await run(bob.wait, "typing cleared", lambda: bob.text("typing") == "")
            # bob has the conversation open: it is read, and alice sees that.
            await run(alice.wait_message, tricky, own=True, status="read")
            await run(bob.say, "Hi Alice, got it")
            await run(alice.wait_message, "Hi Alice, got it", own=False)
            await run(bob.wait_message, "Hi Alice, got it", own=True, status="read")

            # Python to page: unread count, then reading sends carol a receipt.
            sent = await carol.ok("send", to="alice", cid="c-1", body="Hi Alice from Python")

            def carol_unread() -> bool:
                row = next((c for c in alice.convs() if c["conv"] == alice_carol), None)
                return bool(row and row["unread"] == 1 and row["last"] == "Hi Alice from Python")

            await run(alice.wait, "carol's conversation with 1 unread", carol_unread)
            await run(alice.open_conv, alice_carol)
            await run(alice.wait_message, "Hi Alice from Python", own=False)
            await next_push(carol, "receipt", conv=alice_carol, read=sent["seq"])
            await carol.ok("typing", to="alice", on=True)
            await run(
                alice.wait, "carol typing", lambda: alice.text("typing") == "carol is typing…"
            )
            await run(alice.say, "Hello Carol from the browser")
            m = await next_push(carol, "msg", conv=alice_carol)
            assert m["from"] == "alice" and m["body"] == "Hello Carol from the browser"
            await run(alice.wait_message, "Hello Carol from the browser", own=True, pending=False)

            # Presence: carol leaves, alice sees her offline.
            await carol.aclose()
            await run(
                alice.wait,
                "carol offline",
                lambda: alice.friends().get("carol", "").startswith("offline"),
            )
            await run(alice.open_conv, alice_bob)
            await run(alice.screenshot, "chat")
            await run(bob.screenshot, "chat")

        # The server has stopped: both pages were kicked (shutdown) and wait to reconnect.
        _state, text = await run(alice.wait_status, "reconnecting")
        assert text.startswith("Reconnecting in"), text
        assert "restarting (shutdown)" in await run(alice.text, "banner")
        await run(bob.wait_status, "reconnecting")
        await run(alice.say, "Written while offline")
        await run(alice.wait_message, "Written while offline", pending=True, status="sending…")
        await run(alice.screenshot, "reconnecting")

        cfg2 = test_config(**{k: {"port": v} for k, v in ports.items()})  # the same ports
        async with running_server(cfg2, db_dsn) as info2:
            assert info2.tcp_port and info2.ws_port
            carol = await TestClient.tcp(info2.tcp_port)
            await carol.login("carol", register=False)
            await carol.ok("send", to="alice", cid="c-2", body="Sent while you were away")
            await run(alice.wait_status, "online", 45)
            await run(bob.wait_status, "online", 45)
            await run(bob.wait_message, "Written while offline", own=False)
            await run(alice.wait_message, "Written while offline", own=True, pending=False)

            # A send whose connection drops before the reply: re-sent, shown once.
            await run(
                alice.js,
                "document.getElementById('composer-input').value = arguments[0];"
                "document.getElementById('composer').requestSubmit();"
                "window.imClient.dropConnection();",
                "Dropped before the ack",
            )
            await run(alice.wait_status, "online")
            await run(bob.wait_message, "Dropped before the ack", own=False)
            await run(alice.wait_message, "Dropped before the ack", own=True, pending=False)
            assert (await run(alice.js, "return window.imClient.state.stats.resent")) >= 2
            await run(bob.say, "Welcome back")
            await run(alice.wait_message, "Welcome back", own=False)
            await run(bob.wait_message, "Dropped before the ack", own=False)

            # carol's message during the outage shows once in alice's open chat.
            await run(alice.open_conv, alice_carol)
            await run(alice.wait_message, "Sent while you were away", own=False)
            carol_msgs = await run(alice.no_duplicates)
            assert [m["body"] for m in carol_msgs] == [
                "Hi Alice from Python",
                "Hello Carol from the browser",
                "Sent while you were away",
            ]
            await run(alice.open_conv, alice_bob)
            await run(alice.wait_message, "Welcome back", own=False)
            expected = [
                tricky,
                "Hi Alice, got it",
                "Written while offline",
                "Dropped before the ack",
                "Welcome back",
            ]
            for page in (alice, bob):
                msgs = await run(page.no_duplicates)
                assert [m["body"] for m in msgs] == expected, (page.name, msgs)
                assert not any(m["pending"] for m in msgs), (page.name, msgs)
            history = await carol.ok("history", conv=alice_carol)
            assert [m["body"] for m in history["msgs"]] == [m["body"] for m in carol_msgs]
            await run(
                alice.wait, "unread cleared", lambda: all(c["unread"] == 0 for c in alice.convs())
            )
            shot = await run(alice.screenshot, "final")
            await run(bob.screenshot, "final")
            assert shot.stat().st_size > 10_000

            # Replaced: carol's Python client takes alice's device; the page says so
            # and waits for the user instead of fighting back.
            device = await run(alice.js, "return window.imClient.state.device")
            other = await TestClient.tcp(info2.tcp_port)
            await other.login("alice", register=False, device=device)
            await run(alice.wait_status, "offline")
            assert "replaced" in await run(alice.text, "banner")
            await run(alice.click, "#reconnect-btn")
            await run(alice.wait_status, "online")
            frames, _code = await other.closed()
            await other.aclose()
            assert {"op": "kicked", "reason": "replaced"} in frames
            await carol.aclose()

            # A connection that goes silent (no close, no pong). The page is
            # reloaded (the session survives in sessionStorage) with ?ws= through
            # a proxy and test knobs for the ping period and pong timeout.
            async with trio.open_nursery() as nursery:
                proxy = await nursery.start(SilentProxy(info2.ws_port).serve)
                knobs = f"?ws=ws://127.0.0.1:{proxy.port}/ws&ping_s=1&pong_timeout_s=2&page=2"
                await run(alice.navigate, url + knobs)
                await run(alice.wait_status, "online")
                # History comes in pages of 2 now: the last two, then older ones on demand.
                await run(alice.wait_message, "Welcome back", own=False)
                assert [m["body"] for m in await run(alice.messages)] == expected[-2:]
                for shown in (4, 5):
                    await run(alice.click, "#older-btn:not([hidden])")
                    await run(
                        alice.wait, f"{shown} messages", lambda n=shown: len(alice.messages()) == n
                    )
                await run(alice.wait_message, tricky, own=True, status="read")
                await run(
                    alice.wait,
                    "no more pages",
                    lambda: alice.js("return document.getElementById('older-btn').hidden"),
                )
                assert [m["body"] for m in await run(alice.no_duplicates)] == expected
                proxy.cut()
                # This push goes into the void: alice must fill it in with history.
                await run(bob.say, "Lost on the way")
                await run(
                    alice.wait,
                    "pong timeout",
                    lambda: (
                        alice.js("return imClient.state.lastDisconnect") == "no pong within 2 s"
                    ),
                )
                assert (await run(alice.status))[0] != "online"
                proxy.restore()
                await run(alice.wait_status, "online")
                await run(alice.wait_message, "Lost on the way", own=False)
                msgs = await run(alice.no_duplicates)
                assert [m["body"] for m in msgs] == [*expected, "Lost on the way"]
                nursery.cancel_scope.cancel()

            # Log out and back in with the password: the list comes back from sync.
            await run(bob.click, "#logout-btn")
            await run(bob.wait_status, "offline")
            await run(bob.sign_in, "bob", register=False)

            def alice_row() -> bool:
                row = next((c for c in bob.convs() if c["conv"] == alice_bob), None)
                return bool(row and row["last"] == "You: Lost on the way" and row["unread"] == 0)

            await run(bob.wait, "the conversation list after login", alice_row)
