"""The interactive ``imchat``: a prompt_toolkit screen over the Trio client.

prompt_toolkit runs its own asyncio loop, in a worker thread; the client,
its events and every request stay on Trio in the main thread. The two
sides talk through two narrow doors:

* UI -> Trio: :meth:`ChatView.act` puts an action tuple on a bounded Trio
  channel (``trio.from_thread``); a full channel drops the action with a
  note on the status line.
* Trio -> UI: :meth:`ChatView.post` schedules a function on the UI loop
  (``call_soon_threadsafe``); only the UI thread touches the view's state.

Screen, top to bottom: a title line (user, connection, open conversation,
receipts), the conversation list with unread counts beside the open
conversation's messages, a typing line, a status line, the input line.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import trio
from prompt_toolkit.application import Application, get_app
from prompt_toolkit.formatted_text import StyleAndTextTuples
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from prompt_toolkit.layout import HSplit, Layout, VSplit, Window
from prompt_toolkit.layout.controls import FormattedTextControl
from prompt_toolkit.styles import Style
from prompt_toolkit.widgets import TextArea

from .client import Client
from .errors import ClientError, NotFound, RequestError
from .fmt import body_text, clock, conv_peer, conv_title, resolve_conv
from .model import Message, Push

__all__ = ["ChatView", "run_tui"]

HELP = (
    "Type a message and press Enter to send it to the open conversation.",
    "/open USER|CONV|N  open a conversation (N: its number in the list); Tab: next one",
    "/online /away /busy  set presence    /read  mark read    /refresh  reload the list",
    "/quit (or Ctrl-D)  leave",
)
TYPING_SHOWN_S = 6.0
TYPING_RESEND_S = 3.0
LIST_WIDTH = 30

Action = tuple[Any, ...]

STYLE = Style.from_dict(
    {
        "title": "reverse",
        "status": "reverse",
        "selected": "bold",
        "unread": "bold",
        "typing": "italic",
    }
)


class ChatView:
    """What is on screen, and the widgets that show it (UI thread only).

    Args:
        me: The logged-in user.
        act: Called (in the UI thread) with an action for the Trio side.
    """

    def __init__(self, me: str, act: Callable[[Action], None]) -> None:
        self.me = me
        self.act = act
        self.convs: dict[str, dict[str, Any]] = {}  # sync entries, by conv
        self.order: list[str] = []  # most recent first
        self.current: str | None = None
        self.messages: dict[str, dict[int, Message]] = {}
        self.typing: dict[str, tuple[str, float]] = {}
        self.presence: dict[str, str] = {}
        self.receipts: dict[str, dict[str, int]] = {}
        self.status = "connected"
        self.online = True
        self._last_typing = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._early: list[Callable[[], None]] = []

        self.input = TextArea(height=1, prompt="> ", multiline=False, accept_handler=self._accept)
        self.input.buffer.on_text_changed += self._text_changed
        body = VSplit(
            [
                Window(FormattedTextControl(self._conv_list), width=LIST_WIDTH),
                Window(width=1, char="|"),
                Window(FormattedTextControl(self._message_lines), wrap_lines=True),
            ]
        )
        root = HSplit(
            [
                Window(FormattedTextControl(self._title), height=1, style="class:title"),
                body,
                Window(FormattedTextControl(self._typing_line), height=1, style="class:typing"),
                Window(FormattedTextControl(self._status_line), height=1, style="class:status"),
                self.input,
            ]
        )
        keys = KeyBindings()

        @keys.add("c-c")
        @keys.add("c-d")
        def _quit(event: KeyPressEvent) -> None:
            event.app.exit()

        @keys.add("tab")
        def _next(event: KeyPressEvent) -> None:
            if self.order:
                i = self.order.index(self.current) + 1 if self.current in self.order else 0
                self._open(self.order[i % len(self.order)])

        self.app: Application[None] = Application(
            layout=Layout(root, focused_element=self.input),
            key_bindings=keys,
            full_screen=True,
            style=STYLE,
            refresh_interval=1.0,
        )

    # ---------------------------------------------------------- threads

    def run(self) -> None:
        """Run the screen until the user quits (blocks; call in a worker thread)."""
        self.app.run(pre_run=self._started, handle_sigint=False, set_exception_handler=False)

    def _started(self) -> None:
        with self._lock:
            self._loop = asyncio.get_running_loop()
            early, self._early = self._early, []
        for fn in early:
            fn()
        self.app.invalidate()

    def post(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` in the UI thread, then redraw (callable from any thread)."""

        def call() -> None:
            fn()
            self.app.invalidate()

        with self._lock:
            if self._loop is None:
                self._early.append(call)
                return
            loop = self._loop
        try:
            loop.call_soon_threadsafe(call)
        except RuntimeError:
            pass  # the UI loop is gone: the screen was closed

    def exit(self) -> None:
        """Close the screen (callable from any thread)."""
        self.post(lambda: self.app.exit() if self.app.is_running else None)

    # ---------------------------------------------------------- updates (UI thread)

    def set_convs(self, entries: list[dict[str, Any]]) -> None:
        """Replace the conversation list with a ``sync`` result."""
        for e in entries:
            self.convs[str(e["conv"])] = dict(e)
        known = [str(e["conv"]) for e in entries]
        self.order = known + [c for c in self.order if c not in known]
        if self.current is not None:
            self.convs.setdefault(self.current, {"conv": self.current})["unread"] = 0

    def add_message(self, msg: Message) -> None:
        """A message arrived (live, caught up, or our own)."""
        self.messages.setdefault(msg.conv, {})[msg.seq] = msg
        entry = self.convs.setdefault(msg.conv, {"conv": msg.conv, "unread": 0})
        entry["last_seq"] = max(int(entry.get("last_seq", 0) or 0), msg.seq)
        if msg.conv in self.order:
            self.order.remove(msg.conv)
        self.order.insert(0, msg.conv)
        if msg.conv != self.current and msg.sender != self.me and msg.kind != "system":
            entry["unread"] = int(entry.get("unread", 0) or 0) + 1
        typing = self.typing.get(msg.conv)
        if typing is not None and typing[0] == msg.sender:
            del self.typing[msg.conv]

    def show_conv(self, conv: str, msgs: list[Message]) -> None:
        """Open ``conv`` with its recent history."""
        self.current = conv
        stored = self.messages.setdefault(conv, {})
        for m in msgs:
            stored[m.seq] = m
        self.convs.setdefault(conv, {"conv": conv})["unread"] = 0
        if conv not in self.order:
            self.order.insert(0, conv)

    def set_typing(self, conv: str, user: str, on: bool) -> None:
        """``user`` started or stopped typing in ``conv``."""
        if on:
            self.typing[conv] = (user, time.monotonic())
        elif conv in self.typing and self.typing[conv][0] == user:
            del self.typing[conv]

    def set_presence(self, user: str, status: str) -> None:
        """A friend's presence changed."""
        self.presence[user] = status
        self.status = f"{user} is {status}"

    def set_receipt(self, conv: str, user: str, kind: str, seq: int) -> None:
        """``user`` received or read ``conv`` up to ``seq``."""
        self.receipts.setdefault(conv, {})[kind] = seq

    def set_online(self, online: bool) -> None:
        """The connection went down or came back."""
        self.online = online
        self.status = "connected" if online else "connection lost; reconnecting..."

    def set_status(self, text: str) -> None:
        """Show ``text`` on the status line."""
        self.status = text

    # ---------------------------------------------------------- input (UI thread)

    def _accept(self, buffer: Any) -> bool:
        text = buffer.text.strip()
        if not text:
            return False
        if text.startswith("/"):
            self._command(text)
        elif self.current is None:
            self.status = "open a conversation first: /open USER"
        else:
            self.act(("send", self.current, text))
            self._last_typing = 0.0
        return False

    def _command(self, text: str) -> None:
        name, _, rest = text[1:].partition(" ")
        rest = rest.strip()
        if name in ("quit", "exit", "q"):
            self.app.exit()
        elif name == "open" and rest:
            if rest.isdigit() and 1 <= int(rest) <= len(self.order):
                self._open(self.order[int(rest) - 1])
            else:
                self._open(resolve_conv(self.me, rest))
        elif name in ("online", "away", "busy"):
            self.act(("presence", name))
        elif name == "read" and self.current is not None:
            self.act(("read", self.current))
        elif name == "refresh":
            self.act(("refresh",))
        else:
            self.status = "commands: /open USER|CONV|N, /online, /away, /busy, /read, /quit"

    def _open(self, conv: str) -> None:
        self.status = f"opening {conv}..."
        self.act(("open", conv))

    def _text_changed(self, buffer: Any) -> None:
        text = self.input.text
        if self.current is None or not text or text.startswith("/"):
            return
        now = time.monotonic()
        if now - self._last_typing >= TYPING_RESEND_S:
            self._last_typing = now
            self.act(("typing", self.current, True))

    # ---------------------------------------------------------- rendering (UI thread)

    def _title(self) -> StyleAndTextTuples:
        state = "online" if self.online else "reconnecting"
        text = f" imchat  {self.me} ({state})"
        if self.current is not None:
            text += f"  |  {conv_title(self.me, self.current, self.convs.get(self.current))}"
            r = self.receipts.get(self.current, {})
            if "read" in r:
                text += f"  (read up to #{r['read']})"
        return [("", text)]

    def _conv_list(self) -> StyleAndTextTuples:
        out: StyleAndTextTuples = []
        for i, conv in enumerate(self.order, 1):
            entry = self.convs.get(conv, {})
            title = conv_title(self.me, conv, entry)
            peer = conv_peer(self.me, conv)
            if peer is not None and peer in self.presence:
                title += f" ({self.presence[peer]})"
            unread = int(entry.get("unread", 0) or 0)
            mark = ">" if conv == self.current else " "
            line = f"{mark}{i:>2} {title}"[: LIST_WIDTH - 6]
            style = "class:selected" if conv == self.current else ""
            out.append((style, line))
            if unread:
                out.append(("class:unread", f" [{unread}]"))
            out.append(("", "\n"))
        if not self.order:
            out.append(("", " (no conversations)\n"))
        return out

    def _message_lines(self) -> StyleAndTextTuples:
        if self.current is None:
            return [("", "\n".join(HELP))]
        msgs = [self.messages[self.current][s] for s in sorted(self.messages[self.current])]
        if not msgs:
            return [("", "(no messages yet)")]
        lines = [f"{clock(m.ts)} {m.sender}: {body_text(m)}" for m in msgs]
        try:
            rows = max(1, get_app().output.get_size().rows - 4)
        except Exception:  # noqa: BLE001 - no output yet (first render)
            rows = 20
        # Top-aligned until the pane is full, then the newest at the bottom.
        return [("", "\n".join(lines[-rows:]))]

    def _typing_line(self) -> StyleAndTextTuples:
        if self.current is None:
            return []
        t = self.typing.get(self.current)
        if t is None or time.monotonic() - t[1] > TYPING_SHOWN_S:
            return []
        return [("", f" {t[0]} is typing...")]

    def _status_line(self) -> StyleAndTextTuples:
        return [("", f" {self.status}")]


async def _events(client: Client, view: ChatView) -> None:
    """Client events to the screen; marks the open conversation read."""
    me = client.user or ""
    async for event in client.events():
        if isinstance(event, Message):
            view.post(partial(view.add_message, event))
            if event.conv == view.current and event.sender != me:
                try:
                    await client.read(event.conv, event.seq)
                except RequestError as exc:
                    view.post(partial(view.set_status, f"read: {exc}"))
            continue
        assert isinstance(event, Push)
        d = event.data
        if event.op == "typing":
            view.post(partial(view.set_typing, d["conv"], d["user"], bool(d.get("on"))))
        elif event.op == "presence":
            view.post(partial(view.set_presence, d["user"], d["status"]))
        elif event.op == "receipt":
            for kind in ("read", "delivered"):
                if kind in d:
                    view.post(partial(view.set_receipt, d["conv"], d["user"], kind, d[kind]))
        elif event.op in ("connected", "disconnected"):
            view.post(partial(view.set_online, event.op == "connected"))
        elif event.op == "kicked":
            view.post(partial(view.set_status, f"kicked: {d.get('reason')}"))
        elif event.op in ("friend", "group", "notice"):
            view.post(partial(view.set_status, _describe(d)))
    view.post(lambda: view.set_status(f"closed: {client.closed_reason}"))
    view.exit()


def _describe(d: Mapping[str, Any]) -> str:
    op = d.get("op")
    if op == "friend":
        return f"friend {d.get('event')}: {d.get('user')}"
    if op == "group":
        return f"group {d.get('group')}: {d.get('event')} by {d.get('by')}"
    return f"notice: {d.get('title')}"


async def _actions(
    client: Client, view: ChatView, actions: trio.MemoryReceiveChannel[Action]
) -> None:
    """What the user asked for, done on Trio, one at a time."""
    me = client.user or ""
    async for action in actions:
        kind = action[0]
        try:
            if kind == "open":
                conv = action[1]
                try:
                    page = await client.history(conv, limit=50)
                    msgs = page.msgs
                except NotFound:
                    msgs = []
                view.post(partial(view.show_conv, conv, msgs))
                view.post(partial(view.set_status, f"opened {conv}"))
                if msgs:
                    await client.read(conv, msgs[-1].seq)
            elif kind == "send":
                conv, text = action[1], action[2]
                peer = conv_peer(me, conv)
                if peer is not None:
                    await client.send(peer, text)
                else:
                    await client.send(conv=conv, body=text)
            elif kind == "typing":
                conv, on = action[1], action[2]
                peer = conv_peer(me, conv)
                if peer is not None:
                    await client.typing(peer, on=on)
                elif conv.startswith("g:"):
                    await client.typing(group=conv[2:], on=on)
            elif kind == "presence":
                await client.presence(action[1])
                view.post(partial(view.set_status, f"you are {action[1]}"))
            elif kind == "read":
                page = await client.history(action[1], limit=1)
                if page.msgs:
                    await client.read(action[1], page.msgs[-1].seq)
            elif kind == "refresh":
                convs = await client.sync()
                view.post(partial(view.set_convs, convs))
        except ClientError as exc:
            view.post(partial(view.set_status, f"error: {exc}"))


async def _initial(client: Client, view: ChatView) -> None:
    try:
        convs = await client.sync()
        friends = await client.friends()
    except ClientError as exc:
        text = f"error: {exc}"
        view.post(lambda: view.set_status(text))
        return
    view.post(lambda: view.set_convs(convs))
    for f in friends:
        if "status" in f:
            view.post(partial(view.set_presence, f["user"], f["status"]))
    view.post(lambda: view.set_status("connected; /open USER to chat, /quit to leave"))


async def run_tui(client: Client) -> int:
    """Show the interactive screen for a logged-in client until the user quits.

    Returns:
        The exit status (0).
    """
    token = trio.lowlevel.current_trio_token()
    send, receive = trio.open_memory_channel[Action](64)

    def act(action: Action) -> None:
        try:
            trio.from_thread.run_sync(send.send_nowait, action, trio_token=token)
        except trio.WouldBlock:
            view.set_status("busy: try again")
        except trio.RunFinishedError:
            pass

    view = ChatView(client.user or "", act)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_events, client, view)
        nursery.start_soon(_actions, client, view, receive)
        nursery.start_soon(_initial, client, view)
        try:
            await trio.to_thread.run_sync(view.run, abandon_on_cancel=False)
        finally:
            view.exit()
            nursery.cancel_scope.cancel()
    return 0
