/* imserver browser client: one static page, plain JS, no framework.
 *
 * Wire contract: PROTOCOL.md (docs/protocol.md in the repo). MessagePack over
 * WebSocket by default (every map of a binary message is decoded, decodeMulti),
 * JSON text frames with ?encoding=json or the login checkbox.
 *
 * Reliability (PROTOCOL section 3 and 6):
 *  - ping every `heartbeat` seconds (30); no pong within 10 s -> reconnect;
 *  - reconnect on close after 0, 2, 5, 10, then every 30 s;
 *  - on reconnect: auth with the token kept in sessionStorage, re-send every
 *    unacknowledged send with its original cid (the server deduplicates), and
 *    fill gaps per loaded conversation with `history` (messages are stored by
 *    seq, so nothing shows twice).
 *
 * All user text reaches the DOM through textContent, never innerHTML.
 */
"use strict";

(function () {
  const params = new URLSearchParams(location.search);
  const BACKOFF_S = [0, 2, 5, 10, 30];
  // Test knobs: ?ping_s=N pings every N s instead of the server's `heartbeat`,
  // ?pong_timeout_s=N gives up on a silent connection after N s instead of 10.
  const PING_OVERRIDE_S = Number(params.get("ping_s")) || 0;
  const PONG_TIMEOUT_MS = (Number(params.get("pong_timeout_s")) || 10) * 1000;
  const TYPING_SEND_EVERY_MS = 2500; // rate.typing_per_s is 2 with a burst of 5
  const TYPING_IDLE_MS = 4000; // after this without keystrokes we send typing off
  const TYPING_SHOW_MS = 6000; // a typing indicator without renewal fades out
  const PAGE = Math.min(200, Number(params.get("page")) || 50); // ?page=N: history page size
  const FILL_PAGE = 200;
  const KICK_TEXT = {
    replaced: "this device signed in again elsewhere (replaced)",
    too_many_devices: "too many devices are signed in (too_many_devices)",
    slow_consumer: "the connection fell behind (slow_consumer)",
    revoked: "the session was logged out (revoked)",
    shutdown: "the server is restarting (shutdown)",
    timeout: "the server heard nothing for too long (timeout)",
  };
  // Kicks after which reconnecting on our own would just kick someone else.
  const NO_AUTO_RECONNECT = new Set(["replaced", "too_many_devices"]);

  const store = window.sessionStorage;
  const $ = (id) => document.getElementById(id);

  // ---------------------------------------------------------------- helpers

  /** Build an element; string children become text nodes (escaped by the DOM). */
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") el.className = v;
      else if (k === "text") el.textContent = v;
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else if (k === "dataset") Object.assign(el.dataset, v);
      else el.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children) {
      if (c === null || c === undefined || c === false) continue;
      el.append(typeof c === "string" ? document.createTextNode(c) : c);
    }
    return el;
  }

  function randomId(bytes) {
    const a = new Uint8Array(bytes);
    crypto.getRandomValues(a);
    return Array.from(a, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function fmtTime(ms) {
    if (!ms) return "";
    const d = new Date(ms);
    const now = new Date();
    const hm = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    return d.toDateString() === now.toDateString() ? hm : `${d.toLocaleDateString()} ${hm}`;
  }

  function loadJSON(key, fallback) {
    try {
      const v = store.getItem(key);
      return v ? JSON.parse(v) : fallback;
    } catch (e) {
      return fallback;
    }
  }

  function directConv(a, b) {
    return a < b ? `d:${a}:${b}` : `d:${b}:${a}`;
  }

  function peerOf(conv) {
    if (!conv.startsWith("d:") || !state.user) return null;
    const [, a, b] = conv.split(":");
    return a === state.user ? b : a;
  }

  function preview(m) {
    if (!m) return "";
    if (m.recalled) return "(message recalled)";
    if (m.kind === "recall") return "(a message was recalled)";
    if (m.kind && m.kind !== "text" && m.kind !== "system") return `[${m.kind}] ${m.body || ""}`;
    return m.body || "";
  }

  // ------------------------------------------------------------------ state

  const state = {
    user: store.getItem("im.user") || "",
    token: store.getItem("im.token") || "",
    device: store.getItem("im.device") || `web-${randomId(4)}`,
    json: params.get("encoding") === "json" || store.getItem("im.json") === "1",
    wsUrl: null,
    ws: null,
    status: "offline", // connecting | online | reconnecting | offline
    statusDetail: "",
    authed: false,
    attempt: 0, // reconnect attempts since the last successful auth
    reconnectAt: 0,
    reconnectTimer: null,
    connectTimer: null,
    countdownTimer: null,
    pingTimer: null,
    pongTimer: null,
    heartbeatS: 30,
    nextRid: 1,
    requests: new Map(), // rid -> {resolve, reject, op}
    pendingAuth: null, // {op, user, password} while logging in by password
    convs: new Map(), // conv -> sync entry (+ our fields)
    msgs: new Map(), // conv -> {bySeq: Map, contiguous, low, more, loaded, filling, fillTo}
    outbox: loadJSON("im.outbox", []), // unacknowledged sends, in order
    failed: [], // sends the server refused for good
    inflight: new Set(), // cids sent on the current connection, not yet answered
    friends: new Map(), // user -> {status, last_seen, blocked}
    requestsIn: [],
    requestsOut: [],
    open: null, // open conversation id
    readSent: new Map(), // conv -> highest seq we marked read
    recvWant: new Map(), // conv -> highest seq received by push
    recvSent: new Map(), // conv -> highest seq we reported delivered
    recvTimer: null,
    // The peer's cursors from `receipt` pushes (sync does not carry them, so
    // they are kept for the tab's life in sessionStorage).
    peerRead: new Map(loadJSON("im.peerRead", [])),
    peerDelivered: new Map(loadJSON("im.peerDelivered", [])),
    typing: new Map(), // conv -> Map(user -> expiry ms)
    typingSentAt: 0,
    typingOn: false,
    typingIdleTimer: null,
    lastKick: null,
    lastDisconnect: "",
    stats: { connects: 0, authOk: 0, resent: 0, gapFills: 0 },
  };
  store.setItem("im.device", state.device);

  // Exposed for debugging and for the end-to-end test (read-mostly).
  window.imClient = {
    state,
    dropConnection: () => dropSocket("dropped by user"),
    reconnectNow: () => reconnectNow(),
  };

  // ------------------------------------------------------------- transport

  async function resolveWsUrl() {
    const override = params.get("ws");
    if (override) return override;
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const host = location.hostname || "127.0.0.1";
    const hostPart = host.includes(":") ? `[${host}]` : host;
    try {
      const r = await fetch("/api/v1/info", { headers: { Accept: "application/json" } });
      if (!r.ok) throw new Error(`HTTP ${r.status}`);
      const info = await r.json();
      if (info.ws_url) return info.ws_url; // a full URL, when the server knows better (proxies)
      const path = info.ws_path || "/ws";
      return `${scheme}//${hostPart}:${info.ws_port}${path}`;
    } catch (e) {
      console.warn("GET /api/v1/info failed, using the default WebSocket port", e);
      return `${scheme}//${hostPart}:7701/ws`;
    }
  }

  function encode(frame) {
    return state.json ? JSON.stringify(frame) : MessagePack.encode(frame);
  }

  function decodeAll(data) {
    if (typeof data === "string") return [JSON.parse(data)];
    return Array.from(MessagePack.decodeMulti(new Uint8Array(data)));
  }

  function sendFrame(frame) {
    const ws = state.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) return false;
    ws.send(encode(frame));
    return true;
  }

  /** Send a request with a fresh rid; resolves with the ok/pong, rejects with the error. */
  function request(op, fields) {
    return new Promise((resolve, reject) => {
      const rid = state.nextRid++;
      if (!sendFrame({ op, rid, ...(fields || {}) })) {
        reject(Object.assign(new Error("not connected"), { code: "disconnected" }));
        return;
      }
      state.requests.set(rid, { resolve, reject, op });
    });
  }

  function connect() {
    clearTimeout(state.reconnectTimer);
    state.reconnectTimer = null;
    if (state.ws) return;
    if (!state.token && !state.pendingAuth) {
      setStatus("offline");
      showLogin();
      return;
    }
    setStatus("connecting");
    let ws;
    try {
      ws = new WebSocket(state.wsUrl);
    } catch (e) {
      onDisconnected(`cannot open ${state.wsUrl}: ${e.message}`);
      return;
    }
    ws.binaryType = "arraybuffer";
    state.ws = ws;
    state.authed = false;
    state.lastKick = null;
    state.stats.connects++;
    // A connect or sign-in that hangs (no answer at all) counts as a lost connection.
    clearTimeout(state.connectTimer);
    state.connectTimer = setTimeout(() => {
      if (state.ws === ws && !state.authed) dropSocket(`no answer within ${PONG_TIMEOUT_MS / 1000} s`);
    }, PONG_TIMEOUT_MS);
    ws.onopen = () => {
      if (state.pendingAuth) {
        const { op, user, password } = state.pendingAuth;
        request(op, { user, password, device: state.device }).then(onAuthOk, onAuthError);
      } else {
        request("auth", { token: state.token, device: state.device }).then(onAuthOk, onAuthError);
      }
    };
    ws.onmessage = (ev) => {
      let frames;
      try {
        frames = decodeAll(ev.data);
      } catch (e) {
        console.error("undecodable message", e);
        dropSocket("undecodable message from server");
        return;
      }
      for (const f of frames) {
        try {
          onFrame(f);
        } catch (e) {
          console.error("error handling frame", f, e);
        }
      }
    };
    ws.onclose = (ev) => {
      if (state.ws !== ws) return;
      detach(ws);
      onDisconnected(closeText(ev));
    };
    ws.onerror = () => {
      /* a close event always follows */
    };
  }

  function closeText(ev) {
    if (state.lastKick) return `kicked: ${KICK_TEXT[state.lastKick] || state.lastKick}`;
    if (ev.code >= 4001 && ev.code <= 4006) return `kicked (close code ${ev.code})`;
    if (ev.code === 1006) return "connection lost";
    return `connection closed (${ev.code}${ev.reason ? `: ${ev.reason}` : ""})`;
  }

  function detach(ws) {
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    if (state.ws === ws) state.ws = null;
  }

  function closeQuietly(ws) {
    if (!ws) return;
    detach(ws);
    try {
      ws.close();
    } catch (e) {
      /* already closing */
    }
  }

  /** Give up on the current socket at once (pong timeout, decode error, debug). */
  function dropSocket(why) {
    const ws = state.ws;
    if (!ws) return;
    detach(ws);
    try {
      ws.close();
    } catch (e) {
      /* already closing */
    }
    onDisconnected(why);
  }

  function onDisconnected(why) {
    state.lastDisconnect = why;
    stopHeartbeat();
    clearTimeout(state.connectTimer);
    state.authed = false;
    state.ws = null;
    state.inflight.clear();
    for (const [, r] of state.requests) {
      r.reject(Object.assign(new Error("disconnected"), { code: "disconnected" }));
    }
    state.requests.clear();
    state.typing.clear();
    renderTyping();
    const kick = state.lastKick;
    if (state.pendingAuth) {
      // A password login whose connection failed: back to the form.
      state.pendingAuth = null;
      setStatus("offline", why);
      showLogin(`Could not sign in: ${why}`);
      return;
    }
    if (!state.token) {
      setStatus("offline", why);
      showLogin();
      return;
    }
    if (kick === "revoked") {
      forgetSession();
      setStatus("offline", why);
      showLogin(`Signed out: ${KICK_TEXT.revoked}`);
      return;
    }
    if (kick && NO_AUTO_RECONNECT.has(kick)) {
      setStatus("offline", why);
      showBanner(`Disconnected: ${KICK_TEXT[kick]}. Press "Reconnect now" to take over again.`);
      return;
    }
    if (kick) showBanner(`Disconnected: ${KICK_TEXT[kick] || kick}. Reconnecting…`);
    scheduleReconnect(why);
  }

  function scheduleReconnect(why) {
    const delay = BACKOFF_S[Math.min(state.attempt, BACKOFF_S.length - 1)];
    state.attempt++;
    state.reconnectAt = Date.now() + delay * 1000;
    state.statusDetail = why || "";
    clearTimeout(state.reconnectTimer);
    state.reconnectTimer = setTimeout(connect, delay * 1000);
    setStatus("reconnecting", why);
  }

  function reconnectNow() {
    if (state.ws) return;
    state.attempt = 0;
    hideBanner();
    connect();
  }

  function startHeartbeat() {
    stopHeartbeat();
    state.pingTimer = setInterval(() => {
      if (!state.authed) return;
      request("ping").then(
        () => {
          clearTimeout(state.pongTimer);
          state.pongTimer = null;
        },
        () => {},
      );
      if (!state.pongTimer) {
        state.pongTimer = setTimeout(() => {
          state.pongTimer = null;
          dropSocket(`no pong within ${PONG_TIMEOUT_MS / 1000} s`);
        }, PONG_TIMEOUT_MS);
      }
    }, state.heartbeatS * 1000);
  }

  function stopHeartbeat() {
    clearInterval(state.pingTimer);
    clearTimeout(state.pongTimer);
    state.pingTimer = state.pongTimer = null;
  }

  // ---------------------------------------------------------------- session

  function onAuthOk(reply) {
    clearTimeout(state.connectTimer);
    if (state.pendingAuth) {
      state.user = reply.user;
      state.token = reply.token;
      store.setItem("im.user", state.user);
      store.setItem("im.token", state.token);
      store.setItem("im.json", state.json ? "1" : "0");
      state.pendingAuth = null;
    }
    state.authed = true;
    state.attempt = 0;
    state.stats.authOk++;
    state.heartbeatS = PING_OVERRIDE_S || reply.heartbeat || 30;
    startHeartbeat();
    hideBanner();
    setStatus("online");
    showApp();
    resendOutbox();
    refreshAll().catch((e) => console.warn("refresh after auth failed", e));
  }

  function onAuthError(err) {
    if (err.code === "disconnected") return; // onDisconnected handles it
    const ws = state.ws;
    if (state.pendingAuth) {
      state.pendingAuth = null;
      closeQuietly(ws);
      setStatus("offline");
      showLogin(`${err.code}: ${err.message}`);
      return;
    }
    if (err.code === "unauthorized") {
      closeQuietly(ws);
      forgetSession();
      setStatus("offline");
      showLogin("Your session has expired; please sign in again.");
      return;
    }
    // unavailable, rate_limited, internal: try again later.
    dropSocket(`sign-in failed: ${err.code}`);
  }

  function forgetSession() {
    state.token = "";
    state.user = "";
    state.outbox = [];
    state.peerRead.clear();
    state.peerDelivered.clear();
    state.readSent.clear();
    for (const k of ["im.token", "im.user", "im.outbox", "im.open", "im.peerRead", "im.peerDelivered"]) {
      store.removeItem(k);
    }
  }

  async function refreshAll() {
    await Promise.all([loadSync(), loadFriends(), loadRequests()]);
    if (state.open) {
      const box = state.msgs.get(state.open);
      if (!box || !box.loaded) await openConv(state.open);
    }
    markReadIfVisible();
  }

  function logout() {
    const ws = state.ws;
    if (ws && state.authed) request("logout").catch(() => {});
    if (ws) setTimeout(() => ws.readyState < 2 && ws.close(), 500);
    if (ws) detach(ws);
    stopHeartbeat();
    clearTimeout(state.reconnectTimer);
    forgetSession();
    state.convs.clear();
    state.msgs.clear();
    state.friends.clear();
    state.open = null;
    setStatus("offline", "logged out");
    showLogin();
  }

  // ------------------------------------------------------------ sync, lists

  async function loadSync() {
    const reply = await request("sync");
    const seen = new Set();
    for (const c of reply.convs || []) {
      seen.add(c.conv);
      const prev = state.convs.get(c.conv) || {};
      state.convs.set(c.conv, { ...prev, ...c });
      if ((state.readSent.get(c.conv) || 0) < c.read_seq) state.readSent.set(c.conv, c.read_seq);
      const box = state.msgs.get(c.conv);
      if (box && box.loaded) fillTo(c.conv, c.last_seq);
    }
    renderConvs();
    renderChat();
  }

  async function loadFriends() {
    const reply = await request("friends");
    state.friends.clear();
    for (const f of reply.friends || []) state.friends.set(f.user, f);
    renderFriends();
    renderChatHeader();
  }

  async function loadRequests() {
    const reply = await request("friend_requests");
    const reqs = reply.requests || [];
    state.requestsIn = reqs.filter((r) => r.direction === "in");
    state.requestsOut = reqs.filter((r) => r.direction === "out");
    renderRequests();
  }

  // --------------------------------------------------------------- messages

  function box(conv) {
    let b = state.msgs.get(conv);
    if (!b) {
      b = { bySeq: new Map(), contiguous: 0, low: 0, more: false, loaded: false, filling: false, fillTo: 0 };
      state.msgs.set(conv, b);
    }
    return b;
  }

  /** Store a message by seq (so a message can never show twice). */
  function putMsg(conv, m) {
    const b = box(conv);
    const had = b.bySeq.has(m.seq);
    b.bySeq.set(m.seq, { ...(b.bySeq.get(m.seq) || {}), ...m, conv });
    if (m.cid && m.from === state.user) dropPending(m.cid);
    if (m.kind === "recall" && m.meta && m.meta.mid) markRecalled(conv, m.meta.mid);
    return !had;
  }

  function markRecalled(conv, mid) {
    const b = state.msgs.get(conv);
    if (!b) return;
    for (const m of b.bySeq.values()) {
      if (m.mid === mid) {
        m.recalled = true;
        delete m.body;
      }
    }
  }

  function maxSeq(conv) {
    const b = state.msgs.get(conv);
    let mx = b ? b.contiguous : 0;
    if (b) for (const s of b.bySeq.keys()) if (s > mx) mx = s;
    const c = state.convs.get(conv);
    return Math.max(mx, (c && c.last_seq) || 0);
  }

  function advanceContiguous(b) {
    while (b.bySeq.has(b.contiguous + 1)) b.contiguous++;
  }

  /** Make sure a loaded conversation holds every entry up to `target` (history after_seq). */
  function fillTo(conv, target) {
    const b = box(conv);
    if (!b.loaded) return;
    advanceContiguous(b);
    if (target <= b.contiguous) return;
    b.fillTo = Math.max(b.fillTo, target);
    if (b.filling || !state.authed) return;
    b.filling = true;
    state.stats.gapFills++;
    (async () => {
      try {
        while (b.contiguous < b.fillTo && state.authed) {
          const from = b.contiguous;
          const r = await request("history", { conv, after_seq: from, limit: FILL_PAGE });
          const msgs = r.msgs || [];
          for (const m of msgs) putMsg(conv, m);
          if (!msgs.length) {
            b.contiguous = Math.max(b.contiguous, b.fillTo);
            break;
          }
          const top = msgs.length ? msgs[msgs.length - 1].seq : from;
          // Entries hidden from us (deleted) leave holes that history skips.
          b.contiguous = r.more ? Math.max(from, top) : Math.max(top, b.fillTo);
          advanceContiguous(b);
          if (!r.more && b.contiguous < b.fillTo) b.contiguous = b.fillTo;
        }
      } catch (e) {
        console.warn("gap fill failed (will retry on reconnect)", conv, e);
      } finally {
        b.filling = false;
        onConvChanged(conv);
        if (state.open === conv) markReadIfVisible();
      }
    })();
  }

  async function openConv(conv) {
    state.open = conv;
    store.setItem("im.open", conv);
    const b = box(conv);
    renderConvs();
    renderChat();
    if (!b.loaded && state.authed) {
      try {
        const r = await request("history", { conv, limit: PAGE });
        const msgs = r.msgs || [];
        for (const m of msgs) putMsg(conv, m);
        b.low = msgs.length ? msgs[0].seq : 0;
        b.more = !!r.more;
        b.contiguous = msgs.length ? msgs[msgs.length - 1].seq : 0;
        b.loaded = true;
        advanceContiguous(b);
        fillTo(conv, maxSeq(conv));
      } catch (e) {
        if (e.code === "not_found") {
          b.loaded = true; // a direct conversation with no message yet
        } else {
          console.warn("history failed", e);
        }
      }
      if (state.open === conv) renderChat(true);
    }
    markReadIfVisible();
  }

  async function loadOlder() {
    const conv = state.open;
    const b = conv && state.msgs.get(conv);
    if (!b || !b.more || !b.low || b.loadingOlder) return;
    const list = $("messages");
    const fromBottom = list.scrollHeight - list.scrollTop;
    b.loadingOlder = true;
    let r;
    try {
      r = await request("history", { conv, before_seq: b.low, limit: PAGE });
    } finally {
      b.loadingOlder = false;
    }
    const msgs = r.msgs || [];
    for (const m of msgs) putMsg(conv, m);
    if (msgs.length) b.low = msgs[0].seq;
    b.more = !!r.more && msgs.length > 0;
    renderChat();
    list.scrollTop = list.scrollHeight - fromBottom;
  }

  function onMsgPush(m) {
    const conv = m.conv;
    const c = state.convs.get(conv);
    const fromOther = m.from !== state.user;
    if (!c) {
      state.convs.set(conv, {
        conv,
        kind: conv.startsWith("g:") ? "group" : conv.startsWith("wx:") ? "wechat" : "direct",
        title: peerOf(conv) || conv,
        last_seq: m.seq,
        last_msg: m,
        read_seq: 0,
        unread: 0,
        pinned: false,
        muted: false,
      });
    }
    const entry = state.convs.get(conv);
    const b = state.msgs.get(conv);
    const isNew = b && b.loaded ? !b.bySeq.has(m.seq) : m.seq > (entry.last_seq || 0) || !c;
    if (m.seq >= (entry.last_seq || 0)) {
      entry.last_seq = m.seq;
      entry.last_msg = m;
    }
    if (b && b.loaded) {
      const gap = m.seq > b.contiguous + 1;
      putMsg(conv, m);
      advanceContiguous(b);
      if (gap) fillTo(conv, m.seq);
    }
    if (m.kind === "recall" && m.meta) markRecalled(conv, m.meta.mid);
    const counts = fromOther && m.kind !== "system" && m.kind !== "recall";
    if (isNew && counts && !(state.open === conv && pageVisible())) entry.unread = (entry.unread || 0) + 1;
    if (fromOther) {
      clearTyping(conv, m.from);
      queueRecv(conv, m.seq);
    }
    onConvChanged(conv);
    markReadIfVisible();
  }

  function onConvChanged(conv) {
    renderConvs();
    if (state.open === conv) renderChat();
  }

  // ------------------------------------------------------------ sending

  function newCid() {
    return `w${Date.now().toString(36)}${randomId(6)}`;
  }

  function saveOutbox() {
    store.setItem("im.outbox", JSON.stringify(state.outbox));
  }

  function sendMessage(conv, body) {
    const item = { cid: newCid(), conv, body, kind: "text", ts: Date.now() };
    const peer = peerOf(conv);
    if (peer) item.to = peer;
    state.outbox.push(item);
    saveOutbox();
    if (state.authed) sendItem(item);
    onConvChanged(conv);
  }

  function sendItem(item) {
    const target = item.to ? { to: item.to } : { conv: item.conv };
    state.inflight.add(item.cid);
    request("send", { ...target, cid: item.cid, kind: item.kind, body: item.body }).then(
      (r) => {
        state.inflight.delete(item.cid);
        dropPending(item.cid);
        const m = { mid: r.mid, conv: r.conv, seq: r.seq, ts: r.ts, from: state.user, kind: item.kind, body: item.body, cid: item.cid };
        const entry = state.convs.get(r.conv);
        if (entry) {
          if (r.seq >= (entry.last_seq || 0)) {
            entry.last_seq = r.seq;
            entry.last_msg = m;
          }
        } else {
          state.convs.set(r.conv, {
            conv: r.conv,
            kind: r.conv.startsWith("g:") ? "group" : "direct",
            title: peerOf(r.conv) || r.conv,
            last_seq: r.seq,
            last_msg: m,
            read_seq: r.seq,
            unread: 0,
            pinned: false,
            muted: false,
          });
        }
        const b = state.msgs.get(r.conv);
        if (b && b.loaded) {
          const gap = r.seq > b.contiguous + 1;
          putMsg(r.conv, m);
          advanceContiguous(b);
          if (gap) fillTo(r.conv, r.seq);
        }
        onConvChanged(r.conv);
      },
      (e) => {
        state.inflight.delete(item.cid);
        if (e.code === "disconnected") return; // re-sent after reconnect
        if (e.code === "rate_limited" || e.code === "unavailable" || e.code === "internal") {
          const after = Math.max(1, e.retry_after || 2) * 1000;
          setTimeout(() => state.authed && !state.inflight.has(item.cid) && stillPending(item.cid) && sendItem(item), after);
          return;
        }
        dropPending(item.cid);
        state.failed.push({ ...item, error: `${e.code}: ${e.message}` });
        onConvChanged(item.conv);
      },
    );
  }

  function stillPending(cid) {
    return state.outbox.some((i) => i.cid === cid);
  }

  function dropPending(cid) {
    const n = state.outbox.length;
    state.outbox = state.outbox.filter((i) => i.cid !== cid);
    if (state.outbox.length !== n) saveOutbox();
  }

  function resendOutbox() {
    for (const item of state.outbox) {
      state.stats.resent++;
      sendItem(item);
    }
  }

  // ---------------------------------------------- typing, receipts, presence

  function onComposerInput() {
    const conv = state.open;
    if (!conv || !state.authed) return;
    const now = Date.now();
    if (!state.typingOn || now - state.typingSentAt > TYPING_SEND_EVERY_MS) {
      sendTyping(conv, true);
    }
    clearTimeout(state.typingIdleTimer);
    state.typingIdleTimer = setTimeout(() => sendTyping(conv, false), TYPING_IDLE_MS);
  }

  function sendTyping(conv, on) {
    if (!on && !state.typingOn) return;
    state.typingOn = on;
    state.typingSentAt = Date.now();
    const peer = peerOf(conv);
    const target = peer ? { to: peer } : conv.startsWith("g:") ? { group: conv.slice(2) } : null;
    if (!target) return;
    request("typing", { ...target, on }).catch(() => {});
  }

  function onTyping(f) {
    if (f.user === state.user) return;
    let m = state.typing.get(f.conv);
    if (!m) state.typing.set(f.conv, (m = new Map()));
    if (f.on) {
      m.set(f.user, Date.now() + TYPING_SHOW_MS);
      setTimeout(renderTyping, TYPING_SHOW_MS + 50);
    } else {
      m.delete(f.user);
    }
    renderTyping();
  }

  function clearTyping(conv, user) {
    const m = state.typing.get(conv);
    if (m && m.delete(user)) renderTyping();
  }

  function pageVisible() {
    return document.visibilityState === "visible";
  }

  function markReadIfVisible() {
    const conv = state.open;
    if (!conv || !state.authed || !pageVisible()) return;
    const b = state.msgs.get(conv);
    if (!b || !b.loaded) return;
    let top = b.contiguous; // the highest entry shown (gaps are being filled)
    for (const s of b.bySeq.keys()) if (s > top) top = s;
    if (top <= (state.readSent.get(conv) || 0)) return;
    state.readSent.set(conv, top);
    const entry = state.convs.get(conv);
    if (entry) {
      entry.unread = 0;
      entry.read_seq = top;
    }
    request("read", { conv, seq: top }).catch((e) => {
      if (state.readSent.get(conv) === top) state.readSent.set(conv, 0);
      console.warn("read failed", e);
    });
    renderConvs();
  }

  /** Report "delivered" (recv) for pushed messages, coalesced per conversation. */
  function queueRecv(conv, seq) {
    if (seq <= (state.recvWant.get(conv) || 0)) return;
    state.recvWant.set(conv, seq);
    if (state.recvTimer) return;
    state.recvTimer = setTimeout(() => {
      state.recvTimer = null;
      for (const [c, s] of state.recvWant) {
        if (s > (state.recvSent.get(c) || 0) && sendFrame({ op: "recv", conv: c, seq: s })) {
          state.recvSent.set(c, s);
        }
      }
    }, 200);
  }

  function onReceipt(f) {
    if (f.read !== undefined && f.read !== null) {
      state.peerRead.set(f.conv, Math.max(state.peerRead.get(f.conv) || 0, f.read));
    }
    if (f.delivered !== undefined && f.delivered !== null) {
      state.peerDelivered.set(f.conv, Math.max(state.peerDelivered.get(f.conv) || 0, f.delivered));
    }
    store.setItem("im.peerRead", JSON.stringify(Array.from(state.peerRead)));
    store.setItem("im.peerDelivered", JSON.stringify(Array.from(state.peerDelivered)));
    if (state.open === f.conv) renderChat();
  }

  function onPresence(f) {
    const prev = state.friends.get(f.user);
    if (!prev) return;
    state.friends.set(f.user, { ...prev, status: f.status, last_seen: f.last_seen });
    renderFriends();
    renderChatHeader();
  }

  // ------------------------------------------------------------ frame entry

  function onFrame(f) {
    if (f.op === "ok" || f.op === "error" || f.op === "pong") {
      const r = f.rid !== undefined ? state.requests.get(f.rid) : undefined;
      if (!r) {
        if (f.op === "error") console.warn("server error", f);
        return;
      }
      state.requests.delete(f.rid);
      if (f.op === "error") {
        r.reject(Object.assign(new Error(f.message || f.code), { code: f.code, retry_after: f.retry_after }));
      } else {
        r.resolve(f);
      }
      return;
    }
    switch (f.op) {
      case "msg":
        onMsgPush(f);
        break;
      case "typing":
        onTyping(f);
        break;
      case "receipt":
        onReceipt(f);
        break;
      case "read": {
        const entry = state.convs.get(f.conv);
        if (f.seq > (state.readSent.get(f.conv) || 0)) state.readSent.set(f.conv, f.seq);
        if (entry && f.seq >= (entry.last_seq || 0)) entry.unread = 0;
        renderConvs();
        break;
      }
      case "presence":
        onPresence(f);
        break;
      case "friend":
        loadFriends().catch(() => {});
        loadRequests().catch(() => {});
        if (f.event === "request") flash(`${f.user} sent you a friend request`);
        if (f.event === "accepted") flash(`${f.user} is now your friend`);
        break;
      case "recalled":
        markRecalled(f.conv, f.mid);
        onConvChanged(f.conv);
        break;
      case "deleted": {
        const b = state.msgs.get(f.conv);
        if (b) for (const [s, m] of b.bySeq) if (m.mid === f.mid) b.bySeq.delete(s);
        onConvChanged(f.conv);
        break;
      }
      case "conv": {
        const entry = state.convs.get(f.conv);
        if (entry) Object.assign(entry, { pinned: f.pinned, muted: f.muted });
        onConvChanged(f.conv);
        break;
      }
      case "group":
        loadSync().catch(() => {});
        break;
      case "kicked":
        state.lastKick = f.reason;
        showBanner(`Disconnected: ${KICK_TEXT[f.reason] || f.reason}`);
        break;
      case "notice":
        flash(`${f.title || "Notice"}: ${f.body || ""}`);
        break;
      default:
        break;
    }
  }

  // -------------------------------------------------------------- rendering

  function setStatus(s, detail) {
    state.status = s;
    if (detail !== undefined) state.statusDetail = detail;
    clearInterval(state.countdownTimer);
    state.countdownTimer = null;
    if (s === "reconnecting") {
      state.countdownTimer = setInterval(renderStatus, 250);
    }
    renderStatus();
  }

  function renderStatus() {
    const el = $("status");
    let text;
    switch (state.status) {
      case "online":
        text = "Online";
        break;
      case "connecting":
        text = state.attempt ? `Reconnecting… (attempt ${state.attempt})` : "Connecting…";
        break;
      case "reconnecting": {
        const s = Math.max(0, Math.ceil((state.reconnectAt - Date.now()) / 1000));
        text = s > 0 ? `Reconnecting in ${s} s` : "Reconnecting…";
        break;
      }
      default:
        text = "Offline";
    }
    el.dataset.state = state.status;
    document.body.dataset.conn = state.status;
    el.title = state.statusDetail || "";
    $("status-text").textContent =
      state.statusDetail && state.status !== "online" && state.status !== "connecting"
        ? `${text} — ${state.statusDetail}`
        : text;
    $("reconnect-btn").hidden = !(state.token && (state.status === "reconnecting" || state.status === "offline"));
  }

  function showBanner(text) {
    const b = $("banner");
    b.textContent = text;
    b.hidden = false;
  }

  function hideBanner() {
    $("banner").hidden = true;
  }

  let flashTimer = null;
  function flash(text) {
    const el = $("friend-msg");
    el.textContent = text;
    clearTimeout(flashTimer);
    flashTimer = setTimeout(() => (el.textContent = ""), 8000);
  }

  function showLogin(error) {
    $("login-view").hidden = false;
    $("app-view").hidden = true;
    $("logout-btn").hidden = true;
    $("me").hidden = true;
    $("login-error").textContent = error || "";
    $("login-json").checked = state.json;
    renderStatus();
  }

  function showApp() {
    $("login-view").hidden = true;
    $("app-view").hidden = false;
    $("logout-btn").hidden = false;
    $("me").hidden = false;
    $("me").textContent = `${state.user} · ${state.device}${state.json ? " · JSON" : ""}`;
  }

  function sortedConvs() {
    return Array.from(state.convs.values()).sort((a, b) => {
      if (!!a.pinned !== !!b.pinned) return a.pinned ? -1 : 1;
      const ta = (a.last_msg && a.last_msg.ts) || 0;
      const tb = (b.last_msg && b.last_msg.ts) || 0;
      return tb - ta;
    });
  }

  function convTitle(c) {
    return c.title || peerOf(c.conv) || c.conv;
  }

  function renderConvs() {
    const ul = $("conv-list");
    const items = sortedConvs().map((c) => {
      const last = c.last_msg;
      const who = last && last.from && last.from !== state.user && c.kind === "group" ? `${last.from}: ` : last && last.from === state.user ? "You: " : "";
      return h(
        "li",
        {
          class: `conv${state.open === c.conv ? " active" : ""}${c.muted ? " muted" : ""}`,
          dataset: { conv: c.conv },
          onclick: () => openConv(c.conv),
          tabindex: 0,
        },
        h(
          "div",
          { class: "row" },
          h("span", { class: "title", text: convTitle(c) }),
          c.pinned ? h("span", { class: "flag pinned", title: "pinned", text: "📌" }) : null,
          c.muted ? h("span", { class: "flag muted-flag", title: "muted", text: "🔕" }) : null,
          h("span", { class: "time", text: fmtTime(last && last.ts) }),
        ),
        h(
          "div",
          { class: "row" },
          h("span", { class: "last", text: last ? who + preview(last) : "" }),
          c.unread ? h("span", { class: "unread", text: String(c.unread) }) : null,
        ),
      );
    });
    ul.replaceChildren(...items);
    $("conv-empty").hidden = items.length > 0;
  }

  function presenceText(f) {
    if (!f) return "";
    if (f.blocked) return "blocked";
    if (f.status && f.status !== "offline") return f.status;
    return f.last_seen ? `offline, last seen ${fmtTime(f.last_seen)}` : "offline";
  }

  function renderFriends() {
    const ul = $("friend-list");
    const items = Array.from(state.friends.values())
      .sort((a, b) => (a.user < b.user ? -1 : 1))
      .map((f) =>
        h(
          "li",
          {
            class: `friend ${f.status || "offline"}`,
            dataset: { user: f.user },
            onclick: () => openConv(directConv(state.user, f.user)),
            tabindex: 0,
          },
          h("span", { class: "dot" }),
          h("span", { class: "name", text: f.user }),
          h("span", { class: "presence", text: presenceText(f) }),
        ),
      );
    for (const r of state.requestsOut) {
      items.push(
        h("li", { class: "friend pending", dataset: { user: r.user } }, h("span", { class: "name", text: r.user }), h("span", { class: "presence", text: "request sent" })),
      );
    }
    ul.replaceChildren(...items);
  }

  function renderRequests() {
    const ul = $("request-list");
    ul.replaceChildren(
      ...state.requestsIn.map((r) =>
        h(
          "li",
          { class: "request", dataset: { user: r.user } },
          h("span", { class: "name", text: r.user }),
          r.note ? h("span", { class: "note", text: `“${r.note}”` }) : null,
          h("button", { type: "button", class: "accept", text: "Accept", onclick: () => friendOp("friend_accept", r.user) }),
          h("button", { type: "button", class: "reject", text: "Reject", onclick: () => friendOp("friend_reject", r.user) }),
        ),
      ),
    );
    $("requests-section").hidden = state.requestsIn.length === 0;
    renderFriends();
  }

  async function friendOp(op, user) {
    try {
      const r = await request(op, { user });
      flash(`${user}: ${r.result}`);
    } catch (e) {
      flash(`${user}: ${e.code}: ${e.message}`);
    }
    await Promise.all([loadFriends(), loadRequests()]).catch(() => {});
  }

  function renderChatHeader() {
    const conv = state.open;
    if (!conv) return;
    const c = state.convs.get(conv);
    const peer = peerOf(conv);
    $("chat-title").textContent = c ? convTitle(c) : peer || conv;
    const pres = $("chat-presence");
    const f = peer && state.friends.get(peer);
    pres.textContent = f ? presenceText(f) : "";
    pres.dataset.status = (f && f.status) || "";
    $("pin-btn").textContent = c && c.pinned ? "Unpin" : "Pin";
    $("mute-btn").textContent = c && c.muted ? "Unmute" : "Mute";
    $("pin-btn").disabled = $("mute-btn").disabled = !c;
  }

  function ownStatus(conv, m) {
    const read = state.peerRead.get(conv) || 0;
    const delivered = state.peerDelivered.get(conv) || 0;
    if (!peerOf(conv)) return "sent";
    if (m.seq <= read) return "read";
    if (m.seq <= delivered) return "delivered";
    return "sent";
  }

  function msgItem(conv, m, pending) {
    const own = m.from === state.user || pending;
    const kind = m.kind || "text";
    const cls = ["msg", own ? "own" : "other", `kind-${kind}`];
    if (pending) cls.push("pending");
    if (m.recalled) cls.push("recalled");
    let status = null;
    if (pending) status = m.error ? `failed: ${m.error}` : "sending…";
    else if (own && kind !== "system" && kind !== "recall") status = ownStatus(conv, m);
    const showFrom = !own && (conv.startsWith("g:") || conv.startsWith("wx:"));
    if (kind === "system" || kind === "recall") {
      return h("li", { class: cls.join(" "), dataset: { seq: m.seq } }, h("span", { class: "body", text: preview(m) }));
    }
    return h(
      "li",
      { class: cls.join(" "), dataset: { seq: m.seq, cid: m.cid, mid: m.mid, from: m.from || state.user } },
      showFrom ? h("div", { class: "from", text: m.from }) : null,
      h("div", { class: "body", text: m.recalled ? "(message recalled)" : preview(m) }),
      h("div", { class: "meta" }, h("span", { class: "time", text: fmtTime(m.ts) }), status ? h("span", { class: `msg-status ${status.split(/[ :…]/)[0]}`, text: status }) : null),
    );
  }

  function renderChat(scrollToEnd) {
    const conv = state.open;
    $("chat-empty").hidden = !!conv;
    $("chat-pane").hidden = !conv;
    if (!conv) return;
    renderChatHeader();
    const b = box(conv);
    const list = $("messages");
    const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
    const seqs = Array.from(b.bySeq.keys()).sort((x, y) => x - y);
    const items = seqs.map((s) => msgItem(conv, b.bySeq.get(s), false));
    const shown = new Set();
    for (const m of b.bySeq.values()) if (m.cid) shown.add(m.cid);
    for (const item of state.outbox) if (item.conv === conv && !shown.has(item.cid)) items.push(msgItem(conv, { ...item, from: state.user }, true));
    for (const item of state.failed) if (item.conv === conv) items.push(msgItem(conv, { ...item, from: state.user }, true));
    $("message-list").replaceChildren(...items);
    $("older-btn").hidden = !(b.loaded && b.more);
    $("older-none").hidden = !(b.loaded && !b.more);
    renderTyping();
    if (scrollToEnd || atBottom) list.scrollTop = list.scrollHeight;
  }

  function renderTyping() {
    const el = $("typing");
    const conv = state.open;
    const m = conv && state.typing.get(conv);
    const now = Date.now();
    const users = [];
    if (m) {
      for (const [u, exp] of m) {
        if (exp > now) users.push(u);
        else m.delete(u);
      }
    }
    el.textContent = users.length ? `${users.join(", ")} ${users.length > 1 ? "are" : "is"} typing…` : "";
  }

  // ------------------------------------------------------------------ wiring

  function startLogin(op) {
    const user = $("login-user").value.trim();
    const password = $("login-password").value;
    if (!user || !password) {
      $("login-error").textContent = "User and password are required.";
      return;
    }
    state.json = $("login-json").checked;
    state.pendingAuth = { op, user, password };
    state.attempt = 0;
    $("login-error").textContent = "";
    closeQuietly(state.ws);
    state.ws = null;
    clearTimeout(state.reconnectTimer);
    connect();
  }

  $("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    startLogin("login");
  });
  $("btn-register").addEventListener("click", () => startLogin("register"));
  $("logout-btn").addEventListener("click", logout);
  $("reconnect-btn").addEventListener("click", reconnectNow);
  $("older-btn").addEventListener("click", () => loadOlder().catch((e) => console.warn(e)));
  $("composer").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const input = $("composer-input");
    const body = input.value;
    if (!body.trim() || !state.open) return;
    input.value = "";
    clearTimeout(state.typingIdleTimer);
    state.typingOn = false; // the message itself ends typing on the other side
    sendMessage(state.open, body);
  });
  $("composer-input").addEventListener("input", onComposerInput);
  $("add-friend-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const input = $("add-friend-input");
    const to = input.value.trim();
    if (!to) return;
    try {
      const r = await request("friend_request", { to, note: `Hi, this is ${state.user}` });
      input.value = "";
      flash(r.result === "accepted" ? `${to} is now your friend` : `Request sent to ${to}`);
    } catch (e) {
      flash(`${to}: ${e.code}: ${e.message}`);
    }
    await Promise.all([loadFriends(), loadRequests()]).catch(() => {});
  });
  for (const [btn, field] of [
    ["pin-btn", "pinned"],
    ["mute-btn", "muted"],
  ]) {
    $(btn).addEventListener("click", async () => {
      const conv = state.open;
      const c = conv && state.convs.get(conv);
      if (!c) return;
      try {
        const r = await request("conv_set", { conv, [field]: !c[field] });
        Object.assign(c, { pinned: r.pinned, muted: r.muted });
        onConvChanged(conv);
      } catch (e) {
        flash(`${e.code}: ${e.message}`);
      }
    });
  }
  document.addEventListener("visibilitychange", markReadIfVisible);
  window.addEventListener("focus", markReadIfVisible);
  window.addEventListener("online", () => {
    if (state.status === "reconnecting") reconnectNow();
  });

  // ------------------------------------------------------------------- start

  (async () => {
    $("login-json").checked = state.json;
    state.wsUrl = await resolveWsUrl();
    $("ws-url").textContent = state.wsUrl;
    const open = store.getItem("im.open");
    if (state.token) {
      if (open) state.open = open;
      showApp();
      connect();
    } else {
      showLogin();
    }
  })();
})();
