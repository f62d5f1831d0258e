// Tests of whatslike/static/websocket-client.js against a scripted socket and a fake clock.
// Run: node --test tests/js/

import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";

import { ChatStatusClient, CloseCode, backoffDelay } from "../../whatslike/static/websocket-client.js";
import { FakeClock, fakeWebSocketClass, flush, makeJwt, setup, tokenOf } from "./helpers.mjs";

// Errors must be events: any unhandled rejection or exception fails the run.
const escaped = [];
const onEscape = (err) => escaped.push(err);
before(() => {
  process.on("unhandledRejection", onEscape);
  process.on("uncaughtException", onEscape);
});
after(() => {
  process.off("unhandledRejection", onEscape);
  process.off("uncaughtException", onEscape);
  assert.deepEqual(escaped, [], "errors escaped as exceptions or rejections");
});

/** A seeded PRNG (mulberry32), so jitter tests are repeatable. */
function seeded(seed) {
  return () => {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Scripted random values, cycling. */
function script(...values) {
  let i = 0;
  return () => values[i++ % values.length];
}

describe("backoffDelay", () => {
  test("stays in [0, min(cap, base*2^n)) over many attempts, with full jitter", () => {
    const random = seeded(42);
    const base = 500;
    const cap = 15000;
    for (let attempt = 0; attempt < 30; attempt++) {
      const ceiling = Math.min(cap, base * 2 ** attempt);
      const delays = Array.from({ length: 300 }, () => backoffDelay(attempt, base, cap, random));
      for (const d of delays) {
        assert.ok(d >= 0 && d < ceiling, `attempt ${attempt}: ${d} not in [0, ${ceiling})`);
      }
      // Full jitter: spread over the whole window, not bunched at the ceiling.
      assert.ok(Math.min(...delays) < ceiling * 0.1, `attempt ${attempt}: no small delays`);
      assert.ok(Math.max(...delays) > ceiling * 0.9, `attempt ${attempt}: no large delays`);
      const mean = delays.reduce((a, b) => a + b, 0) / delays.length;
      assert.ok(mean > ceiling * 0.35 && mean < ceiling * 0.65, `attempt ${attempt}: mean ${mean}`);
    }
  });

  test("is exactly random() times the ceiling, and below it even when random() returns 1", () => {
    assert.equal(backoffDelay(0, 500, 15000, () => 0), 0);
    assert.equal(backoffDelay(3, 500, 15000, () => 0.5), 2000);
    assert.equal(backoffDelay(10, 500, 15000, () => 0.5), 7500);
    assert.ok(backoffDelay(10, 500, 15000, () => 1) < 15000);
    const d = backoffDelay(2, 100, 1000, Math.random);
    assert.ok(d >= 0 && d < 400);
  });
});

describe("connection", () => {
  test("offers the token as a subprotocol, never in the URL, and walks idle → connecting → open", async () => {
    const t = setup();
    assert.equal(t.client.state, "idle");
    const connected = t.client.connect();
    assert.equal(t.client.state, "connecting");
    const url = new URL(t.last().url);
    assert.equal(url.pathname, "/ws/status");
    assert.equal(url.search, "");
    assert.deepEqual(t.last().protocols, ["whatslike.v1", `access_token.${t.token}`]);
    assert.equal(tokenOf(t.last()), t.token);
    t.accept();
    await connected;
    assert.equal(t.client.state, "open");
    assert.deepEqual(t.of("state").map((s) => [s.previous, s.state]), [["idle", "connecting"], ["connecting", "open"]]);
    assert.equal(t.of("connected").length, 1);
    // connect() again is a no-op.
    await t.client.connect();
    assert.equal(t.sockets.length, 1);
    t.client.disconnect();
  });

  test("emits `frame` for every frame received and `sent` for every frame sent", () => {
    const t = setup();
    t.client.connect();
    const ws = t.accept();
    t.client.subscribe("c1");
    assert.deepEqual(t.of("frame").map((f) => f.type), ["connected"]);
    assert.deepEqual(t.of("sent"), ws.sent);
    t.answer(ws, "c1", 3);
    assert.deepEqual(t.of("frame").map((f) => f.type), ["connected", "subscribed"]);
    t.client.disconnect();
  });

  test("back-off delays follow backoffDelay with the injected random, attempt by attempt", () => {
    const values = [0.9, 0.1, 0.7, 0.3, 0.99, 0.5, 0.25, 0.8];
    const t = setup({ random: script(...values), reconnect: { baseMs: 100, capMs: 2000 } });
    t.client.connect();
    t.accept();
    t.last().serverClose(1006);
    assert.equal(t.client.state, "reconnecting");
    const delays = [];
    for (let attempt = 0; attempt < values.length; attempt++) {
      const [delay] = t.clock.pendingDelays();
      delays.push(delay);
      assert.equal(delay, backoffDelay(attempt, 100, 2000, () => values[attempt]));
      const before = t.sockets.length;
      t.clock.advance(delay);
      assert.equal(t.sockets.length, before + 1, "a new attempt after the delay");
      t.last().fail();
    }
    for (const [n, d] of delays.entries()) assert.ok(d >= 0 && d < Math.min(2000, 100 * 2 ** n));
    assert.ok(new Set(delays).size > 1, "jittered, not one fixed value");
    t.client.disconnect();
  });

  test("the attempt count resets after a connection stays open stableMs", () => {
    const t = setup({ random: () => 0.999, reconnect: { baseMs: 100, capMs: 100000, stableMs: 5000 } });
    t.client.connect();
    t.accept();
    t.last().serverClose(1006);
    for (let i = 0; i < 4; i++) {
      t.clock.advance(t.clock.pendingDelays()[0]);
      t.last().fail();
    }
    // Fifth retry: ceiling 100 * 2^4.
    assert.ok(Math.abs(t.clock.pendingDelays()[0] - 0.999 * 1600) < 0.01);
    t.clock.advance(t.clock.pendingDelays()[0]);
    // Opens, but drops before it is stable: the count goes on.
    t.accept();
    t.clock.advance(4000);
    t.last().serverClose(1006);
    assert.ok(Math.abs(t.clock.pendingDelays()[0] - 0.999 * 3200) < 0.01);
    t.clock.advance(t.clock.pendingDelays()[0]);
    t.accept();
    t.clock.advance(5000);
    t.last().serverClose(1001);
    assert.ok(Math.abs(t.clock.pendingDelays()[0] - 0.999 * 100) < 0.01, "back to attempt 0");
    t.client.disconnect();
  });

  test("gives up after maxAttempts failed attempts: reconnect_failed, closed, no timers", async () => {
    const t = setup({ reconnect: { maxAttempts: 3 } });
    const connected = t.client.connect();
    t.accept();
    t.last().serverClose(1006);
    for (let i = 0; i < 3; i++) {
      assert.equal(t.of("error").length, 0);
      t.clock.advance(t.clock.pendingDelays()[0]);
      t.last().fail();
    }
    assert.equal(t.sockets.length, 4, "the first socket and 3 attempts");
    assert.deepEqual(t.of("error").map((e) => e.code), ["reconnect_failed"]);
    assert.equal(t.client.state, "closed");
    assert.equal(t.clock.pending, 0);
    await connected;
  });

  test("a never-opened first attempt is retried, and connect() waits for it", async () => {
    const t = setup();
    let done = false;
    const p = t.client.connect().then(() => (done = true));
    t.last().fail();
    assert.equal(t.client.state, "reconnecting");
    await flush();
    assert.equal(done, false);
    t.clock.advance(t.clock.pendingDelays()[0]);
    t.accept();
    await p;
    assert.equal(t.client.state, "open");
    t.client.disconnect();
  });
});

describe("handlers and the connection's life", () => {
  test("disconnect() from a `close` handler stops the reconnect", () => {
    const t = setup();
    t.client.on("close", () => t.client.disconnect());
    t.client.connect();
    t.accept();
    t.last().serverClose(1006);
    assert.equal(t.client.state, "closed");
    assert.equal(t.clock.pending, 0);
    t.clock.advance(60_000);
    assert.equal(t.sockets.length, 1);
    assert.deepEqual(t.of("state").map((s) => s.state), ["connecting", "open", "closed"]);
  });

  test("disconnect() from an `error` handler on heartbeat timeout stops the reconnect", () => {
    const t = setup();
    t.client.on("error", (e) => { if (e.code === "heartbeat_timeout") t.client.disconnect(); });
    t.client.connect();
    const ws = t.accept();
    t.clock.advance(25_000 + 10_000);
    assert.equal(t.client.state, "closed");
    assert.equal(t.clock.pending, 0);
    assert.deepEqual(ws.closedWith, { code: 1000, reason: "client disconnect" });
    assert.deepEqual(t.of("close"), [{ code: 1000, reason: "client disconnect", willReconnect: false }]);
    t.clock.advance(60_000);
    assert.equal(t.sockets.length, 1);
  });

  test("disconnect() then connect() from a `close` handler leaves exactly one new attempt", async () => {
    const t = setup();
    let once = true;
    t.client.on("close", () => { if (once) { once = false; t.client.disconnect(); t.client.connect(); } });
    t.client.connect();
    t.accept();
    t.last().serverClose(1006);
    await flush();
    assert.equal(t.sockets.length, 2);
    assert.equal(t.client.state, "connecting");
    assert.equal(t.clock.pending, 1, "only the new attempt's handshake timer");
    t.accept();
    assert.equal(t.client.state, "open");
    t.client.disconnect();
  });

  test("`close` says willReconnect:false when maxAttempts is exhausted", () => {
    const t = setup({ reconnect: { maxAttempts: 1 } });
    t.client.connect();
    t.accept();
    t.last().serverClose(1006);
    t.clock.advance(t.clock.pendingDelays()[0]);
    t.last().fail();
    assert.deepEqual(t.of("close").map((c) => c.willReconnect), [true, false]);
    assert.deepEqual(t.of("error").map((e) => e.code), ["reconnect_failed"]);
    assert.equal(t.client.state, "closed");
    assert.deepEqual(t.of("state").map((x) => x.state), ["connecting", "open", "reconnecting", "closed"]);
    assert.equal(t.clock.pending, 0);
  });

  test("a socket that opens but never sends `connected` times out after heartbeat.timeoutMs", async () => {
    const t = setup({ heartbeat: { timeoutMs: 3_000 } });
    const p = t.client.connect();
    const ws = t.last();
    ws.open();
    t.clock.advance(2_999);
    assert.equal(t.client.state, "connecting");
    t.clock.advance(1);
    assert.deepEqual(t.of("error").map((e) => e.code), ["heartbeat_timeout"]);
    assert.equal(ws.closedWith.code, 4000);
    assert.deepEqual(t.of("close"), [{ code: 4000, reason: "handshake timeout", willReconnect: true }]);
    assert.equal(t.client.state, "reconnecting");
    t.clock.advance(t.clock.pendingDelays()[0]);
    t.accept();
    await p;
    assert.equal(t.client.state, "open");
    t.clock.advance(3_000);
    assert.equal(t.of("error").length, 1, "cleared once connected");
    t.client.disconnect();
  });

  test("a getToken that never settles times out, and its late token opens no second socket", async () => {
    const resolvers = [];
    const t = setup({ getToken: () => new Promise((resolve) => resolvers.push(resolve)), tokenTtlS: null, heartbeat: { timeoutMs: 3_000 } });
    t.client.connect();
    await flush();
    t.clock.advance(3_000);
    assert.deepEqual(t.of("error").map((e) => e.code), ["heartbeat_timeout"]);
    assert.equal(t.client.state, "reconnecting");
    t.clock.advance(t.clock.pendingDelays()[0]);
    await flush();
    assert.equal(resolvers.length, 2);
    resolvers[0](makeJwt({ exp: 2_000_000_000 })); // the abandoned call answers late
    await flush();
    assert.equal(t.sockets.length, 0);
    resolvers[1](makeJwt({ exp: 2_000_000_000 }));
    await flush();
    assert.equal(t.sockets.length, 1);
    t.accept();
    assert.equal(t.client.state, "open");
    t.client.disconnect();
  });
});

describe("close codes", () => {
  const cases = [
    { code: 1000, reason: "idle", retry: true },
    { code: 1001, reason: "server shutting down", retry: true },
    { code: 1006, reason: "", retry: true },
    { code: 1011, reason: "internal error", retry: true },
    { code: 1012, reason: "restart", retry: true },
    { code: 4008, reason: "rate limited", retry: true },
    { code: 4009, reason: "slow consumer", retry: true },
    { code: 1008, reason: "too many malformed frames", retry: false },
    { code: 1009, reason: "frame too big", retry: false },
    { code: 4001, reason: "token expired", retry: false, error: "token_expired" },
  ];
  for (const c of cases) {
    test(`${c.code} ${c.reason || "(network)"} → ${c.retry ? "reconnects" : "terminal"}`, () => {
      const t = setup();
      t.client.connect();
      t.accept();
      t.last().serverClose(c.code, c.reason);
      assert.deepEqual(t.of("close").at(-1), { code: c.code, reason: c.reason, willReconnect: c.retry });
      if (c.retry) {
        assert.equal(t.client.state, "reconnecting");
        t.clock.advance(t.clock.pendingDelays()[0]);
        assert.equal(t.sockets.length, 2);
        t.client.disconnect();
      } else {
        assert.equal(t.client.state, "closed");
        assert.equal(t.clock.pending, 0);
        t.clock.advance(60_000);
        assert.equal(t.sockets.length, 1);
        if (c.error) assert.deepEqual(t.of("error").map((e) => e.code), [c.error]);
      }
    });
  }

  test("CloseCode matches protocol.md §4", () => {
    assert.deepEqual(
      { ...CloseCode },
      { NORMAL: 1000, GOING_AWAY: 1001, POLICY: 1008, TOO_BIG: 1009, TOKEN_EXPIRED: 4001, RATE_LIMITED: 4008, SLOW_CONSUMER: 4009 },
    );
    assert.ok(Object.isFrozen(CloseCode));
  });

  test("disconnect() closes with 1000, cancels every timer, and connect() works again", async () => {
    const getToken = () => makeJwt({ exp: 2_000_000_000 });
    const t = setup({ getToken, tokenTtlS: 120, renewBeforeS: 60 });
    t.client.connect();
    const ws = t.accept();
    t.client.subscribe("c1");
    t.clock.advance(25_000); // a ping, with its timeout pending
    assert.ok(t.clock.pending >= 2, "ping, ping timeout and renewal timers run");
    t.client.disconnect();
    assert.deepEqual(ws.closedWith, { code: 1000, reason: "client disconnect" });
    assert.equal(t.client.state, "closed");
    assert.equal(t.clock.pending, 0);
    assert.deepEqual(t.of("close").at(-1).willReconnect, false);
    ws.serverClose(1000, ""); // the socket's late close event changes nothing
    assert.equal(t.clock.pending, 0);
    assert.equal(t.of("error").length, 0);

    // While waiting to reconnect, too.
    const p = t.client.connect();
    await flush();
    t.accept();
    await p;
    assert.equal(t.client.state, "open");
    assert.equal(t.last().sentOf("subscribe")[0].conversation_id, "c1", "subscriptions survive");
    t.last().serverClose(1006);
    assert.equal(t.clock.pending, 1);
    t.client.disconnect();
    assert.equal(t.clock.pending, 0);
    t.clock.advance(100_000);
    assert.equal(t.sockets.length, 2);
  });
});

describe("subscriptions and seq", () => {
  test("resubscribes every conversation after a reconnect with since = last seq delivered", () => {
    const t = setup();
    t.client.connect();
    let ws = t.accept();
    t.client.subscribe("a");
    t.client.subscribe("b", { since: 7 });
    t.client.subscribe("c");
    t.client.subscribe("d", { since: 4 });
    t.answer(ws, "a", 10);
    t.answer(ws, "b", 9);
    t.answer(ws, "c", 0);
    ws.message(t.status("a", 11));
    ws.message(t.status("a", 12));
    ws.message(t.status("b", 8));
    ws.message(t.status("c", 1));
    // "d" never answered, nothing delivered: it keeps the app's since.
    assert.equal(t.client.lastSeq("a"), 12);
    assert.equal(t.client.lastSeq("b"), 8);
    ws.serverClose(1006);
    t.clock.advance(t.clock.pendingDelays()[0]);
    ws = t.accept();
    const subs = Object.fromEntries(ws.sentOf("subscribe").map((f) => [f.conversation_id, f]));
    assert.equal(subs.a.since, 12);
    assert.equal(subs.b.since, 8);
    assert.equal(subs.c.since, 1);
    assert.equal(subs.d.since, 4);
    assert.ok(new Set(Object.values(subs).map((f) => f.ref)).size === 4, "each subscribe has its own ref");
    // The replay continues each conversation without duplicates.
    t.answer(ws, "a", 13);
    ws.message({ type: "batch", frames: [t.status("a", 13)] });
    ws.message(t.status("a", 12));
    assert.deepEqual(t.seqs("a"), [11, 12, 13]);
    t.client.disconnect();
  });

  test("a subscribe without since and nothing delivered resubscribes without since", () => {
    const t = setup();
    t.client.subscribe("x"); // before connecting: sent on `connected`
    t.client.connect();
    let ws = t.accept();
    assert.equal("since" in ws.sentOf("subscribe")[0], false);
    ws.serverClose(1001);
    t.clock.advance(t.clock.pendingDelays()[0]);
    ws = t.accept();
    assert.equal("since" in ws.sentOf("subscribe")[0], false);
    t.client.disconnect();
  });

  test("a live gap emits `gap` and sends one repair subscribe with since = last", () => {
    const t = setup();
    t.client.connect();
    const ws = t.accept();
    t.client.subscribe("c1");
    t.answer(ws, "c1", 5);
    ws.message(t.status("c1", 6));
    ws.message(t.status("c1", 9)); // 7 and 8 are missing
    ws.message(t.status("c1", 10));
    ws.message({ type: "batch", frames: [t.status("c1", 11), t.status("c1", 12)] });
    assert.deepEqual(t.of("gap"), [{ conversationId: "c1", expected: 7, received: 9 }]);
    const repairs = ws.sentOf("subscribe").slice(1);
    assert.equal(repairs.length, 1, "only one repair in flight");
    assert.equal(repairs[0].since, 6);
    assert.deepEqual(t.seqs("c1"), [6]);
    // The server answers the repair and replays 7…12 in order.
    ws.message({ type: "subscribed", conversation_id: "c1", seq: 12, recovered: true, ref: repairs[0].ref });
    ws.message({ type: "batch", frames: [7, 8, 9, 10, 11, 12].map((s) => t.status("c1", s)) });
    ws.message(t.status("c1", 13));
    assert.deepEqual(t.seqs("c1"), [6, 7, 8, 9, 10, 11, 12, 13]);
    // A later gap can be repaired again.
    ws.message(t.status("c1", 15));
    assert.equal(t.of("gap").length, 2);
    assert.equal(ws.sentOf("subscribe").at(-1).since, 13);
    t.client.disconnect();
  });

  test("a customer's `message` frame shares the seq stream: no gap, emitted as `message`", () => {
    const t = setup();
    t.client.connect();
    const ws = t.accept();
    t.client.subscribe("c1");
    t.answer(ws, "c1", 5);
    const reply = { type: "message", conversation_id: "c1", message_id: "msg_in_1", direction: "in",
      text: "oi", status: "DELIVERED", seq: 7, occurred_at: "2026-01-01T12:00:00.000Z" };
    ws.message(t.status("c1", 6));
    ws.message(reply);
    ws.message({ type: "batch", frames: [reply, t.status("c1", 8)] });
    assert.deepEqual(t.seqs("c1"), [6, 8]);
    assert.deepEqual(t.of("message"), [reply]);
    assert.equal(t.of("gap").length, 0);
    t.client.disconnect();
  });

  test("markRead sends a read frame: read_ok is a `read` event, a refusal an error naming the message", () => {
    const t = setup();
    assert.equal(t.client.markRead("c1", "msg_in_1"), false, "not open: nothing sent");
    t.client.connect();
    const ws = t.accept();
    assert.equal(t.client.markRead("c1", "msg_in_1"), true);
    assert.equal(t.client.markRead("c1", "msg_none"), true);
    const [first, second] = ws.sentOf("read");
    assert.deepEqual([first.conversation_id, first.message_id], ["c1", "msg_in_1"]);
    assert.notEqual(first.ref, second.ref);
    ws.message({ type: "read_ok", conversation_id: "c1", message_id: "msg_in_1", ref: first.ref });
    ws.message({ type: "error", code: "not_found", message: "no such message", ref: second.ref });
    assert.deepEqual(t.of("read"), [{ conversationId: "c1", messageId: "msg_in_1" }]);
    const [refused] = t.of("error");
    assert.deepEqual([refused.code, refused.conversationId, refused.messageId], ["not_found", "c1", "msg_none"]);
    t.client.disconnect();
  });

  test("duplicates are ignored: the same seq twice, and an old seq after a newer one", () => {
    const t = setup();
    t.client.connect();
    const ws = t.accept();
    t.client.subscribe("c1", { since: 0 });
    t.answer(ws, "c1", 3);
    ws.message(t.status("c1", 1));
    ws.message(t.status("c1", 1));
    ws.message(t.status("c1", 2));
    ws.message(t.status("c1", 3));
    ws.message(t.status("c1", 2));
    ws.message({ type: "batch", frames: [t.status("c1", 1), t.status("c1", 3), t.status("c1", 4)] });
    assert.deepEqual(t.seqs("c1"), [1, 2, 3, 4]);
    assert.equal(t.of("gap").length, 0);
    t.client.disconnect();
  });

  test("batch frames are unwrapped in order, across conversations", () => {
    const t = setup();
    t.client.connect();
    const ws = t.accept();
    t.client.subscribe("a");
    t.client.subscribe("b");
    t.answer(ws, "a", 0);
    t.answer(ws, "b", 20);
    ws.message({ type: "batch", frames: [t.status("a", 1), t.status("b", 21), t.status("a", 2), t.status("b", 22)] });
    assert.deepEqual(t.of("status").map((f) => `${f.conversation_id}${f.seq}`), ["a1", "b21", "a2", "b22"]);
    assert.equal(t.of("status")[0].message_id, "m1", "the frame is handed on whole");
    t.client.disconnect();
  });

  test("the subscribed answer sets the baseline: without since last = seq; frames before it are dropped", () => {
    const t = setup();
    t.client.connect();
    const ws = t.accept();
    t.client.subscribe("c1");
    ws.message(t.status("c1", 3)); // no baseline yet
    t.answer(ws, "c1", 40);
    assert.equal(t.client.lastSeq("c1"), 40);
    ws.message(t.status("c1", 40));
    ws.message(t.status("c1", 41));
    assert.deepEqual(t.seqs("c1"), [41]);
    assert.deepEqual(t.of("subscribed"), [{ conversationId: "c1", seq: 40, recovered: true }]);
    t.client.disconnect();
  });

  test("recovered:false emits `reload` and moves the baseline to the answer's seq", () => {
    const t = setup();
    t.client.connect();
    let ws = t.accept();
    t.client.subscribe("c1", { since: 50 });
    t.answer(ws, "c1", 30, { recovered: false }); // the client outlived the store's history
    assert.deepEqual(t.of("reload"), [{ conversationId: "c1", seq: 30 }]);
    assert.equal(t.client.lastSeq("c1"), 30);
    ws.message(t.status("c1", 31));
    assert.deepEqual(t.seqs("c1"), [31]);
    ws.serverClose(4009, "slow consumer");
    t.clock.advance(t.clock.pendingDelays()[0]);
    ws = t.accept();
    assert.equal(ws.sentOf("subscribe")[0].since, 31);
    t.client.disconnect();
  });

  test("forbidden and too_many_subscriptions remove the conversation from the restore set", () => {
    const t = setup();
    t.client.connect();
    let ws = t.accept();
    t.client.subscribe("ok");
    t.client.subscribe("other-org");
    t.client.subscribe("one-too-many");
    const [, forbidden, tooMany] = ws.sentOf("subscribe");
    t.answer(ws, "ok", 1);
    ws.message({ type: "error", code: "forbidden", message: "not available", ref: forbidden.ref });
    ws.message({ type: "error", code: "too_many_subscriptions", message: "limit", ref: tooMany.ref });
    ws.message({ type: "error", code: "rate_limited", message: "slow down", ref: null });
    assert.deepEqual(
      t.of("error").map((e) => [e.code, e.conversationId]),
      [["forbidden", "other-org"], ["too_many_subscriptions", "one-too-many"], ["rate_limited", undefined]],
    );
    assert.equal(t.client.lastSeq("other-org"), undefined);
    ws.serverClose(1006);
    t.clock.advance(t.clock.pendingDelays()[0]);
    ws = t.accept();
    assert.deepEqual(ws.sentOf("subscribe").map((f) => f.conversation_id), ["ok"]);
    t.client.disconnect();
  });

  test("a late `unsubscribed` after subscribing again (off/on) is not emitted", () => {
    const t = setup();
    t.client.connect();
    const ws = t.accept();
    t.client.subscribe("c1");
    t.answer(ws, "c1", 3);
    t.client.unsubscribe("c1");
    t.client.subscribe("c1");
    const [request] = ws.sentOf("unsubscribe");
    ws.message({ type: "unsubscribed", conversation_id: "c1", ref: request.ref });
    t.answer(ws, "c1", 3);
    assert.deepEqual(t.of("unsubscribed"), []);
    assert.equal(t.of("subscribed").length, 2);
    ws.message(t.status("c1", 4));
    assert.deepEqual(t.seqs("c1"), [4]);
    t.client.disconnect();
  });

  test("unsubscribe stops delivery and restoration", () => {
    const t = setup();
    t.client.connect();
    let ws = t.accept();
    t.client.subscribe("c1");
    t.answer(ws, "c1", 1);
    t.client.unsubscribe("c1");
    const [request] = ws.sentOf("unsubscribe");
    assert.equal(request.conversation_id, "c1");
    ws.message(t.status("c1", 2)); // already on its way
    ws.message({ type: "unsubscribed", conversation_id: "c1", ref: request.ref });
    assert.deepEqual(t.of("unsubscribed"), [{ conversationId: "c1" }]);
    assert.deepEqual(t.seqs("c1"), []);
    ws.serverClose(1006);
    t.clock.advance(t.clock.pendingDelays()[0]);
    ws = t.accept();
    assert.equal(ws.sentOf("subscribe").length, 0);
    t.client.disconnect();
  });
});

describe("tokens", () => {
  test("renews renewBeforeS before exp with getToken + auth; auth_ok reschedules", async () => {
    const now = () => Math.floor(t.clock.now() / 1000);
    const issued = [];
    const getToken = async () => {
      const token = makeJwt({ exp: now() + 600 });
      issued.push(token);
      return token;
    };
    const t = setup({ getToken, tokenTtlS: 600, renewBeforeS: 60, heartbeat: { intervalMs: 1e9 } });
    t.client.connect();
    const ws = t.accept(); // token_exp = now + 600
    t.clock.advance(539_000);
    await flush();
    assert.equal(ws.sentOf("auth").length, 0);
    t.clock.advance(1_000);
    await flush();
    const [auth] = ws.sentOf("auth");
    assert.equal(auth.token, issued[0]);
    assert.ok(auth.ref);
    ws.message({ type: "auth_ok", token_exp: now() + 600, ref: auth.ref });
    // The next renewal comes 540 s later, not before.
    t.clock.advance(539_000);
    await flush();
    assert.equal(ws.sentOf("auth").length, 1);
    t.clock.advance(1_000);
    await flush();
    assert.equal(ws.sentOf("auth").length, 2);
    assert.equal(t.of("error").length, 0);
    // A reconnect uses the latest token.
    ws.serverClose(1006);
    t.clock.advance(t.clock.pendingDelays()[0]);
    await flush();
    assert.equal(tokenOf(t.last()), issued[1]);
    t.client.disconnect();
  });

  test("the server's connected.token_exp wins over the JWT's exp", async () => {
    let calls = 0;
    const t = setup({ getToken: () => (calls++, makeJwt({ exp: 9_999_999_999 })), tokenTtlS: 3600, renewBeforeS: 60, heartbeat: { intervalMs: 1e9 } });
    t.client.connect();
    t.accept({ token_exp: Math.floor(t.clock.now() / 1000) + 100 });
    t.clock.advance(40_000);
    await flush();
    assert.equal(calls, 1);
    assert.equal(t.last().sentOf("auth").length, 1);
    t.client.disconnect();
  });

  test("4001 → getToken, then reconnect at once", async () => {
    const fresh = makeJwt({ exp: 2_000_000_000 });
    let calls = 0;
    const t = setup({ getToken: async () => (calls++, fresh), random: () => 0.99 });
    t.client.connect();
    const ws = t.accept();
    ws.serverClose(4001, "token expired");
    assert.equal(t.of("close").at(-1).willReconnect, true);
    assert.deepEqual(t.clock.pendingDelays(), [0]);
    t.clock.advance(0);
    await flush();
    assert.equal(calls, 1);
    assert.equal(t.sockets.length, 2);
    assert.equal(tokenOf(t.last()), fresh);
    t.client.disconnect();
  });

  test("a never-opened attempt calls getToken before the next attempt", async () => {
    let calls = 0;
    const t = setup({ getToken: () => makeJwt({ exp: 2_000_000_000, n: ++calls }) });
    t.client.connect();
    assert.equal(calls, 0, "the given token is used first");
    t.last().fail(); // e.g. a 401 upgrade
    t.clock.advance(t.clock.pendingDelays()[0]);
    await flush();
    assert.equal(calls, 1);
    assert.equal(t.sockets.length, 2);
    t.client.disconnect();
  });

  test("only getToken: fetches the first token before connecting", async () => {
    const token = makeJwt({ exp: 2_000_000_000 });
    const t = setup({ getToken: () => token, tokenTtlS: null });
    const p = t.client.connect();
    await flush();
    assert.equal(tokenOf(t.last()), token);
    t.accept();
    await p;
    t.client.disconnect();
  });

  test("an expired token without getToken is terminal: token_expired", async () => {
    const t = setup({ tokenTtlS: -10 });
    await t.client.connect();
    assert.equal(t.sockets.length, 0, "no pointless upgrade");
    assert.deepEqual(t.of("error").map((e) => e.code), ["token_expired"]);
    assert.equal(t.client.state, "closed");
    assert.equal(t.clock.pending, 0);
  });

  test("a never-opened attempt once the token has expired, without getToken, is terminal", () => {
    const t = setup({ tokenTtlS: 1 });
    t.client.connect(); // valid when the attempt starts…
    t.clock.advance(2_000); // …expired by the time the upgrade is refused
    t.last().fail();
    assert.deepEqual(t.of("close").at(-1).willReconnect, false);
    assert.deepEqual(t.of("error").map((e) => e.code), ["token_expired"]);
    assert.equal(t.client.state, "closed");
    assert.equal(t.clock.pending, 0);
    assert.equal(t.sockets.length, 1);
  });

  test("a failed renewal keeps the connection and retries at half the remaining life; 4001 takes over", async () => {
    let fail = true;
    let calls = 0;
    const fresh = makeJwt({ exp: 2_000_000_000 });
    const getToken = async () => {
      calls++;
      if (fail) throw new Error("token endpoint 503");
      return fresh;
    };
    const t = setup({ getToken, tokenTtlS: 120, renewBeforeS: 60, heartbeat: { intervalMs: 1e9 } });
    t.client.connect();
    const ws = t.accept(); // exp = now + 120
    t.clock.advance(60_000);
    await flush();
    assert.equal(calls, 1);
    assert.deepEqual(t.of("error").map((e) => e.code), ["token_renewal_failed"]);
    assert.equal(t.client.state, "open");
    assert.equal(ws.closedWith, null, "the socket is kept: its token is valid 60 s more");
    // The next try: half of the 60 s left.
    assert.ok(t.clock.pendingDelays().includes(30_000), String(t.clock.pendingDelays()));
    t.clock.advance(30_000);
    await flush();
    assert.equal(calls, 2);
    t.clock.advance(15_000);
    await flush();
    assert.equal(calls, 3);
    // 15 s left: at least RENEW_RETRY_MIN_MS (5 s) between tries, none once too late.
    t.clock.advance(7_500);
    await flush();
    t.clock.advance(5_000);
    await flush();
    const before = calls;
    t.clock.advance(10_000);
    await flush();
    assert.equal(calls, before, "no tries past exp");
    assert.equal(t.client.state, "open");
    // The server ends it with 4001; the reconnect asks for a token again, which now works.
    fail = false;
    ws.serverClose(4001, "token expired");
    t.clock.advance(0);
    await flush();
    assert.equal(tokenOf(t.last()), fresh);
    t.client.disconnect();
  });

  test("a rejected getToken before connecting is retried with back-off, within maxAttempts", async () => {
    let fail = true;
    let calls = 0;
    const fresh = makeJwt({ exp: 2_000_000_000 });
    const getToken = async () => {
      calls++;
      if (fail) throw new TypeError("Failed to fetch"); // the token server is restarting
      return fresh;
    };
    const t = setup({ getToken, tokenTtlS: null });
    const p = t.client.connect();
    await flush();
    assert.deepEqual(t.of("error").map((e) => e.code), ["token_renewal_failed"]);
    assert.equal(t.client.state, "reconnecting");
    assert.equal(t.sockets.length, 0);
    assert.deepEqual(t.clock.pendingDelays(), [backoffDelay(0, 500, 15000, () => 0.5)]);
    t.clock.advance(t.clock.pendingDelays()[0]);
    await flush();
    assert.equal(calls, 2);
    fail = false;
    t.clock.advance(t.clock.pendingDelays()[0]);
    await flush();
    assert.equal(calls, 3);
    assert.equal(tokenOf(t.last()), fresh);
    t.accept();
    await p;
    assert.equal(t.client.state, "open");
    t.client.disconnect();

    // After 4001 too; and maxAttempts still ends it.
    const t2 = setup({ getToken: async () => { throw new Error("offline"); }, reconnect: { maxAttempts: 2 } });
    t2.client.connect();
    t2.accept();
    t2.last().serverClose(4001, "token expired");
    for (let i = 0; i < 3; i++) {
      t2.clock.advance(t2.clock.pendingDelays()[0]);
      await flush();
    }
    assert.deepEqual(t2.of("error").map((e) => e.code), ["token_renewal_failed", "token_renewal_failed", "token_renewal_failed", "reconnect_failed"]);
    assert.equal(t2.client.state, "closed");
    assert.equal(t2.clock.pending, 0);
    assert.equal(t2.sockets.length, 1);
  });

  test("a token living longer than setTimeout's ~24.8-day limit is renewed on time, not at once", async () => {
    let calls = 0;
    const ttl = 30 * 24 * 3600;
    const t = setup({ getToken: () => (calls++, makeJwt({ exp: 2_000_000_000 })), tokenTtlS: ttl, renewBeforeS: 60, heartbeat: { intervalMs: 2e9, timeoutMs: 2e9 } });
    t.client.connect();
    t.accept();
    assert.ok(t.clock.pendingDelays().every((d) => d <= 2 ** 31 - 1), String(t.clock.pendingDelays()));
    t.clock.advance(2 ** 31 - 1); // the capped timer fires early: it re-arms instead
    await flush();
    assert.equal(calls, 0);
    t.clock.advance((ttl - 60) * 1000 - (2 ** 31 - 1) - 1);
    await flush();
    assert.equal(calls, 0);
    t.clock.advance(1);
    await flush();
    assert.equal(calls, 1);
    assert.equal(t.last().sentOf("auth").length, 1);
    t.client.disconnect();
  });

  test("a renewal interrupted by disconnect()/connect() keeps its token, and the new connection renews", async () => {
    const resolvers = [];
    const getToken = () => new Promise((resolve) => resolvers.push(resolve));
    const t = setup({ getToken, tokenTtlS: 120, renewBeforeS: 60, heartbeat: { intervalMs: 1e9 } });
    const oldExp = Math.floor(t.clock.now() / 1000) + 120;
    t.client.connect();
    t.accept();
    t.clock.advance(61_000);
    await flush();
    assert.equal(resolvers.length, 1, "renewal started");
    t.client.disconnect();
    t.client.connect(); // still the old token: the fresh one has not come yet
    await flush();
    assert.equal(tokenOf(t.last()), t.token);
    const fresh = makeJwt({ exp: 2_000_000_000 });
    resolvers[0](fresh);
    await flush();
    t.accept({ token_exp: oldExp });
    t.clock.advance(0);
    await flush();
    assert.equal(resolvers.length, 2, "the new connection renews its old token at once");
    const renewed = makeJwt({ exp: 2_000_000_001 });
    resolvers[1](renewed);
    await flush();
    assert.deepEqual(t.last().sentOf("auth").map((f) => f.token), [renewed]);
    // And a later connection starts with the fresh token.
    t.client.disconnect();
    const t2 = setup({ getToken, tokenTtlS: 120, renewBeforeS: 60, heartbeat: { intervalMs: 1e9 } });
    resolvers.length = 0;
    t2.client.connect();
    t2.accept();
    t2.clock.advance(61_000);
    await flush();
    t2.client.disconnect();
    resolvers[0](fresh);
    await flush();
    t2.client.connect();
    await flush();
    assert.equal(tokenOf(t2.last()), fresh);
    t2.client.disconnect();
  });

  test("a refused auth (bad_request) is an error event and keeps the connection", async () => {
    const t = setup({ getToken: () => "not-a-jwt", tokenTtlS: 120, renewBeforeS: 60, heartbeat: { intervalMs: 1e9 } });
    t.client.connect();
    const ws = t.accept();
    t.clock.advance(60_000);
    await flush();
    const [auth] = ws.sentOf("auth");
    ws.message({ type: "error", code: "bad_request", message: "invalid token", ref: auth.ref });
    assert.deepEqual(t.of("error").map((e) => [e.code, e.ref]), [["bad_request", auth.ref]]);
    assert.equal(t.client.state, "open");
    t.client.disconnect();
  });
});

describe("heartbeat", () => {
  test("pings every heartbeat_s; silence after a ping → heartbeat_timeout, close 4000, reconnect", () => {
    const t = setup({ heartbeat: { timeoutMs: 5_000 } });
    t.client.connect();
    const ws = t.accept({ heartbeat_s: 10 });
    t.client.subscribe("c1");
    t.answer(ws, "c1", 4);
    t.clock.advance(10_000);
    const [ping] = ws.sentOf("ping");
    assert.deepEqual(ping, { type: "ping", ts: t.clock.now() });
    ws.message({ type: "pong", ts: ping.ts });
    t.clock.advance(10_000);
    assert.equal(ws.sentOf("ping").length, 2);
    t.clock.advance(4_999);
    assert.equal(t.of("error").length, 0);
    t.clock.advance(1);
    assert.deepEqual(t.of("error").map((e) => e.code), ["heartbeat_timeout"]);
    assert.equal(ws.closedWith.code, 4000);
    assert.deepEqual(t.of("close").at(-1), { code: 4000, reason: "heartbeat timeout", willReconnect: true });
    assert.equal(t.client.state, "reconnecting");
    t.clock.advance(t.clock.pendingDelays()[0]);
    const ws2 = t.accept();
    assert.equal(ws2.sentOf("subscribe")[0].since, 4);
    t.client.disconnect();
  });

  test("any frame, not just pong, proves the socket alive; intervalMs overrides heartbeat_s", () => {
    const t = setup({ heartbeat: { intervalMs: 1_000, timeoutMs: 800 } });
    t.client.connect();
    const ws = t.accept({ heartbeat_s: 25 });
    t.client.subscribe("c1");
    t.clock.advance(1_000);
    assert.equal(ws.sentOf("ping").length, 1);
    t.clock.advance(500);
    t.answer(ws, "c1", 0);
    t.clock.advance(700);
    assert.equal(t.of("error").length, 0);
    assert.equal(t.client.state, "open");
    t.client.disconnect();
  });
});

describe("errors never throw", () => {
  test("malformed frames, throwing handlers and unknown frames become events or are ignored", () => {
    const t = setup();
    t.client.on("status", () => {
      throw new Error("app bug");
    });
    const logged = [];
    const original = console.error;
    console.error = (...args) => logged.push(args);
    try {
      t.client.connect();
      const ws = t.accept();
      t.client.subscribe("c1");
      t.answer(ws, "c1", 0);
      assert.doesNotThrow(() => ws.message("{not json"));
      assert.doesNotThrow(() => ws.message(t.status("c1", 1)));
      assert.doesNotThrow(() => ws.message({ type: "something_new" }));
      assert.doesNotThrow(() => ws.message({ type: "batch" }));
      assert.doesNotThrow(() => ws.message(t.status("nobody", 1)));
      ws.message(t.status("c1", 2));
    } finally {
      console.error = original;
    }
    assert.deepEqual(t.of("error").map((e) => e.code), ["protocol"]);
    assert.deepEqual(t.seqs("c1"), [1, 2], "the client's state survives a throwing handler");
    assert.equal(logged.length, 2);
    t.client.disconnect();
  });

  test("a batch whose frames is not an array is ignored without throwing", () => {
    const t = setup();
    t.client.connect();
    const ws = t.accept();
    t.client.subscribe("c1");
    t.answer(ws, "c1", 0);
    for (const frames of [5, "abc", { 0: t.status("c1", 1) }, null]) {
      assert.doesNotThrow(() => ws.message({ type: "batch", frames }));
    }
    ws.message(t.status("c1", 1));
    assert.deepEqual(t.seqs("c1"), [1]);
    t.client.disconnect();
  });

  test("an invalid or relative url is a terminal `protocol` error event, and connect() resolves", async () => {
    for (const url of ["/ws/status", "not a url"]) {
      const t = setup({ url });
      await t.client.connect();
      assert.deepEqual(t.of("error").map((e) => e.code), ["protocol"]);
      assert.match(t.of("error")[0].message, /invalid url/);
      assert.equal(t.client.state, "closed");
      assert.equal(t.clock.pending, 0);
      assert.equal(t.sockets.length, 0);
    }
  });

  test("no token and no getToken is an error event, not an exception", async () => {
    const clock = new FakeClock();
    const { FakeWebSocket } = fakeWebSocketClass();
    const client = new ChatStatusClient({ url: "ws://h/ws/status", WebSocket: FakeWebSocket, timers: clock });
    const errors = [];
    client.on("error", (e) => errors.push(e.code));
    await client.connect();
    assert.deepEqual(errors, ["token_expired"]);
    assert.equal(client.state, "closed");
  });

  test("a WebSocket constructor that throws is an error event", async () => {
    const client = new ChatStatusClient({
      url: "ws://h/ws/status",
      token: makeJwt({ exp: 2_000_000_000 }),
      WebSocket: class { constructor() { throw new SyntaxError("bad url"); } },
      timers: new FakeClock(),
    });
    const errors = [];
    client.on("error", (e) => errors.push(e.code));
    await client.connect();
    assert.deepEqual(errors, ["protocol"]);
    assert.equal(client.state, "closed");
  });
});

describe("campaigns' live counts", () => {
  const counts = (read, sent) => ({ waiting: 0, queued: 0, sent, delivered: 0, read, failed: 0, failed_by_code: {} });
  const frame = (version, read, extra = {}) => ({
    type: "campaign",
    campaign_id: "cmp_1",
    version,
    total: 10,
    counts: counts(read, 10 - read),
    finished: true,
    ...extra,
  });

  test("subscribes once open, emits the snapshot and only higher versions after it", () => {
    const t = setup();
    t.client.subscribeCampaign("cmp_1"); // before connecting: sent on `connected`
    t.client.connect();
    const ws = t.accept();
    const [request] = ws.sentOf("subscribe_campaign");
    assert.equal(request.campaign_id, "cmp_1");
    ws.message(frame(3, 1, { ref: request.ref }));
    ws.message(frame(5, 4));
    ws.message(frame(4, 3)); // older: counts move between buckets, so only the version orders them
    ws.message(frame(5, 4)); // the same again
    ws.message(frame(9, 10));
    assert.deepEqual(t.of("campaign").map((f) => f.version), [3, 5, 9]);
    assert.equal(t.client.campaign("cmp_1").counts.read, 10);
    t.client.subscribeCampaign("cmp_1"); // already followed: nothing sent
    assert.equal(ws.sentOf("subscribe_campaign").length, 1);
  });

  test("a reconnect subscribes again and an older snapshot does not take the counts back", () => {
    const t = setup();
    t.client.connect();
    let ws = t.accept();
    t.client.subscribeCampaign("cmp_1");
    ws.message(frame(7, 6, { ref: ws.sentOf("subscribe_campaign")[0].ref }));
    ws.serverClose(1001, "going away");
    t.clock.advance(20_000);
    ws = t.accept();
    const [again] = ws.sentOf("subscribe_campaign");
    assert.equal(again.campaign_id, "cmp_1");
    ws.message(frame(6, 5, { ref: again.ref })); // a hub behind: dropped
    ws.message(frame(8, 7));
    assert.deepEqual(t.of("campaign").map((f) => f.version), [7, 8]);
  });

  test("a refused subscribe is an error event naming the campaign, which is forgotten", () => {
    const t = setup();
    t.client.connect();
    const ws = t.accept();
    t.client.subscribeCampaign("cmp_other");
    const [request] = ws.sentOf("subscribe_campaign");
    ws.message({ type: "error", code: "forbidden", message: "campaign 'cmp_other' is not available", ref: request.ref });
    assert.deepEqual(t.of("error").map((e) => [e.code, e.campaignId]), [["forbidden", "cmp_other"]]);
    ws.message(frame(1, 1, { campaign_id: "cmp_other" }));
    assert.deepEqual(t.of("campaign"), []);
    assert.equal(t.client.campaign("cmp_other"), undefined);
  });

  test("unsubscribing sends unsubscribe_campaign, emits its answer and drops later frames", () => {
    const t = setup();
    t.client.connect();
    const ws = t.accept();
    t.client.subscribeCampaign("cmp_1");
    ws.message(frame(1, 0, { ref: ws.sentOf("subscribe_campaign")[0].ref }));
    t.client.unsubscribeCampaign("cmp_1");
    const [request] = ws.sentOf("unsubscribe_campaign");
    assert.equal(request.campaign_id, "cmp_1");
    ws.message(frame(2, 1)); // on its way before the unsubscribe arrived
    ws.message({ type: "campaign_unsubscribed", campaign_id: "cmp_1", ref: request.ref });
    assert.deepEqual(t.of("campaign").map((f) => f.version), [1]);
    assert.deepEqual(t.of("campaignUnsubscribed"), [{ campaignId: "cmp_1" }]);
  });
});
