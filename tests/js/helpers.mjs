// Test doubles for websocket-client.js: a scripted WebSocket and a manual clock.

import { ChatStatusClient } from "../../whatslike/static/websocket-client.js";

/** Manual timers: nothing runs until `advance(ms)`, which runs due timers in time order. */
export class FakeClock {
  constructor(now = 1_700_000_000_000) {
    this.time = now;
    this.timers = new Map();
    this.nextId = 1;
  }
  now = () => this.time;
  setTimeout = (fn, ms) => {
    const id = this.nextId++;
    this.timers.set(id, { at: this.time + Math.max(0, ms), fn, id });
    return id;
  };
  clearTimeout = (id) => {
    this.timers.delete(id);
  };
  /** Delays (from now) of the pending timers, soonest first. */
  pendingDelays() {
    return [...this.timers.values()].sort((a, b) => a.at - b.at || a.id - b.id).map((t) => t.at - this.time);
  }
  get pending() {
    return this.timers.size;
  }
  advance(ms) {
    const target = this.time + ms;
    for (;;) {
      const due = [...this.timers.values()].filter((t) => t.at <= target).sort((a, b) => a.at - b.at || a.id - b.id)[0];
      if (!due) break;
      this.timers.delete(due.id);
      this.time = due.at;
      due.fn();
    }
    this.time = target;
  }
}

/** A WebSocket class whose instances the test drives by hand. */
export function fakeWebSocketClass() {
  const sockets = [];
  class FakeWebSocket {
    static CONNECTING = 0;
    static OPEN = 1;
    static CLOSED = 3;
    constructor(url, protocols) {
      this.url = url;
      this.protocols = protocols;
      this.readyState = 0;
      this.sent = [];
      this.closedWith = null;
      sockets.push(this);
    }
    send(text) {
      if (this.readyState !== 1) throw new Error("send on a socket that is not open");
      this.sent.push(JSON.parse(text));
    }
    close(code, reason) {
      this.closedWith = { code, reason };
      this.readyState = 3;
    }
    // --- the test's side ---
    open() {
      this.readyState = 1;
      this.onopen?.({});
    }
    message(obj) {
      this.onmessage?.({ data: typeof obj === "string" ? obj : JSON.stringify(obj) });
    }
    /** The server (or network) closes the socket. */
    serverClose(code, reason = "") {
      this.readyState = 3;
      this.onclose?.({ code, reason });
    }
    /** The attempt fails before opening (refused upgrade, no route). */
    fail() {
      this.readyState = 3;
      this.onerror?.({});
      this.onclose?.({ code: 1006, reason: "" });
    }
    /** Frames sent of one type. */
    sentOf(type) {
      return this.sent.filter((f) => f.type === type);
    }
  }
  return { FakeWebSocket, sockets };
}

export function makeJwt(claims) {
  const b64 = (obj) => Buffer.from(JSON.stringify(obj)).toString("base64url");
  return `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ sub: "u1", org_id: "o1", ...claims })}.c2ln`;
}

export const flush = () => new Promise((resolve) => setImmediate(resolve));

/** A client on fakes, with every event recorded in order. */
export function setup({ random = () => 0.5, tokenTtlS = 3600, ...options } = {}) {
  const clock = new FakeClock();
  const { FakeWebSocket, sockets } = fakeWebSocketClass();
  const token = options.token === undefined && tokenTtlS !== null ? makeJwt({ exp: Math.floor(clock.now() / 1000) + tokenTtlS }) : options.token;
  const client = new ChatStatusClient({
    url: "ws://localhost:8000/ws/status",
    WebSocket: FakeWebSocket,
    timers: clock,
    random,
    ...options,
    token,
  });
  const events = [];
  for (const name of ["state", "connected", "status", "message", "read", "subscribed", "unsubscribed", "reload", "gap", "error", "close", "frame", "sent", "campaign", "campaignUnsubscribed"]) {
    client.on(name, (payload) => events.push({ name, payload }));
  }
  const of = (name) => events.filter((e) => e.name === name).map((e) => e.payload);
  const last = () => sockets[sockets.length - 1];
  /** Opens the newest socket and sends `connected`. */
  const accept = (extra = {}) => {
    const ws = last();
    ws.open();
    ws.message({
      type: "connected",
      connection_id: `conn${sockets.length}`,
      user_id: "u1",
      org_id: "o1",
      heartbeat_s: 25,
      token_exp: Math.floor(clock.now() / 1000) + tokenTtlS,
      ...extra,
    });
    return ws;
  };
  /** Answers the newest subscribe for a conversation as the real server would. */
  const answer = (ws, conversationId, seq, { recovered = true } = {}) => {
    const request = ws.sentOf("subscribe").filter((f) => f.conversation_id === conversationId).at(-1);
    ws.message({ type: "subscribed", conversation_id: conversationId, seq, recovered, ref: request.ref });
    return request;
  };
  const status = (conversationId, seq, extra = {}) => ({
    type: "status",
    conversation_id: conversationId,
    message_id: `m${seq}`,
    status: "SENT",
    seq,
    occurred_at: "2024-01-01T00:00:00.000Z",
    error: null,
    ...extra,
  });
  const seqs = (conversationId) => of("status").filter((f) => f.conversation_id === conversationId).map((f) => f.seq);
  return { clock, sockets, client, events, of, last, accept, answer, status, seqs, token };
}

/** The token a socket was opened with (it travels as a subprotocol, never in the URL). */
export function tokenOf(socket) {
  const offered = (socket.protocols ?? []).find((p) => p.startsWith("access_token."));
  return offered === undefined ? null : offered.slice("access_token.".length);
}
