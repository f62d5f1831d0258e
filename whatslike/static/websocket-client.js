// Whatslike's client for `/ws/status` (docs/protocol.md §4 and §7). Dependency-free ES
// module: loads from `<script type="module">` and from Node ≥ 20 (given a WebSocket
// constructor). The contract is websocket-client.d.ts; its doc comments are normative.

/** Close codes of docs/protocol.md §4. */
/** The subprotocol the server selects, and the one that carries the token. */
export const SUBPROTOCOL = "whatslike.v1";
export const TOKEN_SUBPROTOCOL_PREFIX = "access_token.";

export const CloseCode = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001,
  POLICY: 1008,
  TOO_BIG: 1009,
  TOKEN_EXPIRED: 4001,
  RATE_LIMITED: 4008,
  SLOW_CONSUMER: 4009,
});

// The client's own close code for a socket it declared dead (no frame after a ping).
const HEARTBEAT_CLOSE = 4000;
// Codes after which trying again cannot help: the same frames or origin fail again.
const TERMINAL_CODES = new Set([CloseCode.POLICY, CloseCode.TOO_BIG]);
const OPEN = 1; // WebSocket.OPEN, spelled out so fakes without the constant still work.
// setTimeout keeps its delay in a signed 32-bit int: anything longer (~24.8 days, e.g. a
// long-lived token's renewal) overflows and fires at once. #timer caps delays at this, so a
// longer wait fires early instead; the renewal, the one wait that can be that long, re-arms.
const MAX_TIMER_MS = 2 ** 31 - 1;
// After a failed renewal, the next try waits half the token's remaining life, but at least
// this long, so a token endpoint that is down is not hammered in the last seconds.
const RENEW_RETRY_MIN_MS = 5000;

/**
 * Exponential back-off with full jitter: uniform in [0, min(capMs, baseMs * 2^attempt)).
 * Full jitter (rather than "ceiling ± a little") spreads a crowd of clients that lost the
 * same server over the whole window, so they do not all come back in the same instant.
 * @param {number} attempt 0 for the first retry.
 * @param {number} baseMs
 * @param {number} capMs
 * @param {() => number} [random] returns [0, 1); default Math.random.
 * @returns {number}
 */
export function backoffDelay(attempt, baseMs, capMs, random = Math.random) {
  const ceiling = Math.min(capMs, baseMs * 2 ** Math.max(0, attempt));
  return Math.min(random(), 1 - Number.EPSILON) * ceiling;
}

/** The `exp` claim of a JWT (seconds), read without verification; undefined if absent. */
function tokenExp(token) {
  try {
    const part = String(token).split(".")[1];
    const b64 = part.replace(/-/g, "+").replace(/_/g, "/");
    const json = atob(b64 + "=".repeat((4 - (b64.length % 4)) % 4));
    const exp = JSON.parse(json).exp;
    return typeof exp === "number" ? exp : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Live message statuses per conversation (and campaigns' counts) over one WebSocket, with
 * reconnection, recovery by `seq`, heartbeats and token renewal. Errors are reported as
 * `error` events, never thrown. See websocket-client.d.ts for the options and events.
 */
export class ChatStatusClient {
  #o; #WS; #timers; #random;
  #state = "idle";
  #handlers = new Map();
  #token; #exp;
  #ws = null;
  #opened = false; // the current socket fired `open` (else a failure is a refused upgrade)
  #openedAt = 0;
  #epoch = 0; // bumped on disconnect: late callbacks of an older life are ignored
  #attempt = 0; // reconnect attempts since the last stable connection
  #freshToken = false; // ask getToken before the next attempt
  #refs = new Map(); // ref → {kind, conversationId?, since?} of requests in flight
  #nextRef = 1;
  #subs = new Map(); // conversationId → {since, last, repairRef}: the restore set
  #campaigns = new Map(); // campaignId → the latest `campaign` frame (or null): followed campaigns
  #t = { reconnect: null, handshake: null, ping: null, pingTimeout: null, renew: null };
  #heartbeatMs = 25000;
  #renewedExp; // the exp a renewal was already tried for (stops a tight renew loop)
  #waiters = [];

  /** @param {import("./websocket-client.js").ChatStatusClientOptions} options */
  constructor(options) {
    this.#o = {
      renewBeforeS: 60,
      ...options,
      reconnect: { baseMs: 500, capMs: 15000, maxAttempts: Infinity, stableMs: 10000, ...options.reconnect },
      heartbeat: { timeoutMs: 10000, ...options.heartbeat },
    };
    this.#WS = options.WebSocket ?? globalThis.WebSocket;
    this.#random = options.random ?? Math.random;
    this.#timers = options.timers ?? {
      setTimeout: (fn, ms) => globalThis.setTimeout(fn, ms),
      clearTimeout: (h) => globalThis.clearTimeout(h),
      now: () => Date.now(),
    };
    this.#setToken(options.token);
  }

  /** @returns {"idle"|"connecting"|"open"|"reconnecting"|"closed"} */
  get state() { return this.#state; }

  /** Highest `seq` delivered for a followed conversation (the baseline after a reload). */
  lastSeq(conversationId) { return this.#subs.get(conversationId)?.last; }

  /** Registers an event handler (see ClientEvents in the d.ts). @returns {this} */
  on(event, handler) {
    if (!this.#handlers.has(event)) this.#handlers.set(event, new Set());
    this.#handlers.get(event).add(handler);
    return this;
  }

  /** @returns {this} */
  off(event, handler) {
    this.#handlers.get(event)?.delete(handler);
    return this;
  }

  /**
   * Opens the socket. Resolves when `connected` arrives or the client closes for good;
   * never rejects (errors are events). A no-op when already open or connecting.
   * @returns {Promise<void>}
   */
  connect() {
    if (this.#state === "open") return Promise.resolve();
    const waiting = new Promise((resolve) => this.#waiters.push(resolve));
    if (this.#state === "idle" || this.#state === "closed") {
      this.#attempt = 0;
      this.#setState("connecting");
      this.#start(this.#epoch);
    }
    return waiting;
  }

  /**
   * Follows a conversation. `since` asks for the frames after it; without it only changes
   * after the server's current seq follow. Kept across reconnects.
   * @param {string} conversationId
   * @param {{since?: number}} [options]
   */
  subscribe(conversationId, options = {}) {
    const since = options.since;
    const sub = this.#subs.get(conversationId);
    if (sub && since === undefined) return; // already followed; nothing new to ask
    // An explicit `since` restarts the baseline: the app wants the replay from there.
    this.#subs.set(conversationId, { since, last: undefined, repairRef: null });
    this.#sendSubscribe(conversationId, since);
  }

  /** The latest counts of a followed campaign (the `campaign` frame of the highest
   * version received), or undefined before its snapshot. */
  campaign(campaignId) { return this.#campaigns.get(campaignId) ?? undefined; }

  /**
   * Follows a campaign's live counts: its snapshot, then a `campaign` event whenever they
   * moved (only ever a higher `version`). Kept across reconnects.
   * @param {string} campaignId
   */
  subscribeCampaign(campaignId) {
    if (this.#campaigns.has(campaignId)) return;
    this.#campaigns.set(campaignId, null);
    this.#sendSubscribeCampaign(campaignId);
  }

  /** Stops following a campaign (and forgets it for reconnects). */
  unsubscribeCampaign(campaignId) {
    if (!this.#campaigns.delete(campaignId)) return;
    this.#send({ type: "unsubscribe_campaign", campaign_id: campaignId, ref: this.#ref({ kind: "unsubscribe_campaign", campaignId }) });
  }

  /** Stops following a conversation (and forgets it for reconnects). */
  unsubscribe(conversationId) {
    if (!this.#subs.delete(conversationId)) return;
    this.#send({ type: "unsubscribe", conversation_id: conversationId, ref: this.#ref({ kind: "unsubscribe", conversationId }) });
  }

  /**
   * Marks a customer's message read (what `POST …/messages/{id}/read` does): answered by a
   * `read` event, or an `error` event (`not_found`, `not_inbound`, `not_arrived`,
   * `forbidden`) naming the conversation and message. Sent only while open (answers
   * false otherwise: mark it again once connected, it is idempotent).
   * @param {string} conversationId
   * @param {string} messageId
   * @returns {boolean}
   */
  markRead(conversationId, messageId) {
    const ref = this.#ref({ kind: "read", conversationId, messageId });
    const sent = this.#send({ type: "read", conversation_id: conversationId, message_id: messageId, ref });
    if (!sent) this.#refs.delete(ref);
    return sent;
  }

  /** Closes with 1000 and stops reconnecting; `connect()` may start again later. */
  disconnect() {
    if (this.#state === "closed" || this.#state === "idle") {
      this.#clearTimers();
      this.#setState("closed");
      return;
    }
    this.#shutdown(CloseCode.NORMAL, "client disconnect");
  }

  // --- events and plumbing ---

  #emit(event, payload) {
    for (const handler of [...(this.#handlers.get(event) ?? [])]) {
      // One faulty handler must neither break the client's state nor reach the socket.
      try { handler(payload); } catch (err) { console.error(`whatslike: '${event}' handler failed`, err); }
    }
  }

  #error(code, message, extra = {}) { this.#emit("error", { code, message, ...extra }); }

  #setState(state) {
    const previous = this.#state;
    if (previous === state) return;
    this.#state = state;
    this.#emit("state", { state, previous });
    if (state === "open" || state === "closed") this.#waiters.splice(0).forEach((resolve) => resolve());
  }

  #setToken(token) {
    this.#token = token;
    this.#exp = token ? tokenExp(token) : undefined;
  }

  #expired() { return this.#exp !== undefined && this.#exp * 1000 <= this.#timers.now(); }

  #timer(name, ms, fn) {
    this.#cancel(name);
    const delay = Math.min(Math.max(0, ms), MAX_TIMER_MS);
    this.#t[name] = this.#timers.setTimeout(() => { this.#t[name] = null; fn(); }, delay);
  }

  #cancel(name) {
    if (this.#t[name] !== null) this.#timers.clearTimeout(this.#t[name]);
    this.#t[name] = null;
  }

  #clearTimers() { for (const name of Object.keys(this.#t)) this.#cancel(name); }

  #ref(request) {
    const ref = `r${this.#nextRef++}`;
    this.#refs.set(ref, request);
    return ref;
  }

  #send(frame) {
    if (!this.#ws || this.#ws.readyState !== OPEN || this.#state !== "open") return false;
    this.#ws.send(JSON.stringify(frame));
    this.#emit("sent", frame);
    return true;
  }

  /** Sends a subscribe when open; when not, the restore on `connected` sends it. */
  #sendSubscribe(conversationId, since) {
    if (this.#state !== "open") return null;
    const ref = this.#ref({ kind: "subscribe", conversationId, since });
    const frame = { type: "subscribe", conversation_id: conversationId, ref };
    if (since !== undefined && since !== null) frame.since = since;
    this.#send(frame);
    return ref;
  }

  #sendSubscribeCampaign(campaignId) {
    if (this.#state !== "open") return;
    this.#send({ type: "subscribe_campaign", campaign_id: campaignId, ref: this.#ref({ kind: "subscribe_campaign", campaignId }) });
  }

  // --- the connection's life ---

  /** One connection attempt: a token first when needed, then the socket. */
  async #start(epoch) {
    // Until `connected` arrives nothing else watches the attempt: a getToken that never
    // settles or an upgrade that stalls would leave the client `connecting` for ever.
    this.#timer("handshake", this.#o.heartbeat.timeoutMs, () => this.#onHandshakeTimeout());
    const getToken = this.#o.getToken;
    if (getToken && (this.#freshToken || !this.#token || this.#expired())) {
      let token;
      try {
        token = await getToken();
      } catch (err) {
        // Often transient (the token endpoint restarts with the server): retry with back-off,
        // within maxAttempts, like a failed socket.
        if (epoch === this.#epoch) this.#retryWithoutSocket("token_renewal_failed", `getToken failed: ${err?.message ?? err}`);
        return;
      }
      if (epoch !== this.#epoch) return; // disconnected (or timed out) while the token was fetched
      this.#freshToken = false;
      this.#setToken(token);
    }
    if (!this.#token || (this.#expired() && !getToken)) {
      this.#fail("token_expired", this.#token ? "the token has expired and there is no getToken" : "no token and no getToken");
      return;
    }
    let url;
    try {
      url = new URL(this.#o.url); // throws on a relative or malformed url
    } catch (err) {
      this.#fail("protocol", `invalid url ${JSON.stringify(this.#o.url)}: ${err?.message ?? err}`);
      return;
    }
    // Browsers cannot set headers on an upgrade, and a token in the URL lands in access
    // logs: it travels as a subprotocol (docs/protocol.md §4); the server picks the first.
    const protocols = [SUBPROTOCOL, TOKEN_SUBPROTOCOL_PREFIX + this.#token];
    let ws;
    try {
      ws = new this.#WS(url.toString(), protocols);
    } catch (err) {
      this.#fail("protocol", `cannot open a WebSocket: ${err?.message ?? err}`);
      return;
    }
    this.#ws = ws;
    this.#opened = false;
    this.#refs.clear(); // answers to an older socket's requests can no longer come
    ws.onopen = () => { this.#opened = true; this.#openedAt = this.#timers.now(); };
    ws.onmessage = (ev) => this.#onMessage(ev.data);
    ws.onclose = (ev) => this.#onClose(ev.code ?? 1006, ev.reason ?? "");
    ws.onerror = () => {}; // a close event always follows; it carries what can be known
  }

  #detach() {
    const ws = this.#ws;
    this.#ws = null;
    if (ws) ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    for (const sub of this.#subs.values()) sub.repairRef = null;
    this.#cancel("handshake"); this.#cancel("ping"); this.#cancel("pingTimeout"); this.#cancel("renew");
    return ws;
  }

  /** Closes our socket on purpose and stops for good (disconnect or a terminal error). */
  #shutdown(code, reason, error) {
    this.#epoch++;
    const ws = this.#detach();
    this.#clearTimers();
    if (ws) {
      try { ws.close(code, reason); } catch { /* already closing */ }
      this.#emit("close", { code, reason, willReconnect: false });
    }
    if (error) this.#error(error.code, error.message);
    this.#setState("closed");
  }

  #fail(code, message) { this.#shutdown(CloseCode.NORMAL, code, { code, message }); }

  // Event handlers may call disconnect() (or disconnect() then connect()), which bumps the
  // epoch. The paths below check it after every emit, so that they do not override the
  // app's decision with a reconnect scheduled for a life that has ended.

  #onClose(code, reason) {
    const epoch = this.#epoch;
    const opened = this.#opened;
    const stable = opened && this.#timers.now() - this.#openedAt >= this.#o.reconnect.stableMs;
    this.#detach();
    if (stable) this.#attempt = 0;
    const getToken = this.#o.getToken;
    let terminal = null;
    if (TERMINAL_CODES.has(code)) terminal = { code: "protocol", message: `closed by the server: ${code} ${reason}` };
    else if (code === CloseCode.NORMAL && reason !== "idle") terminal = { code: "closed", message: `closed by the server: ${reason}` };
    else if ((code === CloseCode.TOKEN_EXPIRED || (!opened && this.#expired())) && !getToken) {
      terminal = { code: "token_expired", message: "the token has expired and there is no getToken" };
    } else if (code !== CloseCode.TOKEN_EXPIRED && this.#attemptsExhausted()) {
      // Decided before `close` is emitted, so that its willReconnect tells the truth.
      terminal = this.#gaveUp();
    }
    this.#emit("close", { code, reason, willReconnect: !terminal });
    if (epoch !== this.#epoch) return;
    if (terminal) {
      this.#stop(terminal.code === "closed" ? null : terminal);
      return;
    }
    this.#setState("reconnecting");
    if (epoch !== this.#epoch) return;
    if (code === CloseCode.TOKEN_EXPIRED) {
      // Nothing was wrong with the server or network: renew and come straight back.
      this.#freshToken = true;
      this.#timer("reconnect", 0, () => this.#start(this.#epoch));
      return;
    }
    if (!opened) this.#freshToken = true; // a refused upgrade is most often a stale token
    this.#scheduleReconnect();
  }

  /** An attempt failed before it had a socket (getToken failed or never answered). */
  #retryWithoutSocket(code, message) {
    const epoch = this.#epoch;
    this.#cancel("handshake");
    this.#freshToken = true;
    this.#error(code, message);
    if (epoch !== this.#epoch) return;
    if (this.#attemptsExhausted()) {
      this.#stop(this.#gaveUp());
      return;
    }
    this.#setState("reconnecting");
    if (epoch !== this.#epoch) return;
    this.#scheduleReconnect();
  }

  #attemptsExhausted() { return this.#attempt >= this.#o.reconnect.maxAttempts; }

  #gaveUp() { return { code: "reconnect_failed", message: `gave up after ${this.#attempt} attempts` }; }

  /** Stops for good without a socket to close (it is gone already). */
  #stop(error) {
    this.#epoch++;
    this.#clearTimers();
    if (error) this.#error(error.code, error.message);
    this.#setState("closed");
  }

  /** Callers have checked #attemptsExhausted() first. */
  #scheduleReconnect() {
    const { baseMs, capMs } = this.#o.reconnect;
    const delay = backoffDelay(this.#attempt, baseMs, capMs, this.#random);
    this.#attempt++;
    this.#timer("reconnect", delay, () => this.#start(this.#epoch));
  }

  // --- incoming frames ---

  #onMessage(data) {
    let frame;
    try {
      frame = JSON.parse(typeof data === "string" ? data : new TextDecoder().decode(data));
    } catch {
      this.#error("protocol", "a frame that is not JSON was received");
      return;
    }
    if (!frame || typeof frame !== "object") return;
    // Any frame at all proves the socket alive.
    this.#cancel("pingTimeout");
    this.#emit("frame", frame);
    switch (frame.type) {
      case "connected": return this.#onConnected(frame);
      case "status":
      case "message": return this.#onChange(frame);
      case "batch":
        // A malformed batch must not throw out of onmessage.
        if (Array.isArray(frame.frames)) for (const f of frame.frames) this.#onChange(f);
        return;
      case "subscribed": return this.#onSubscribed(frame);
      case "campaign": return this.#onCampaign(frame);
      case "campaign_unsubscribed": return this.#onCampaignUnsubscribed(frame);
      case "unsubscribed": return this.#onUnsubscribed(frame);
      case "auth_ok": return this.#onAuthOk(frame);
      case "read_ok": return this.#onReadOk(frame);
      case "error": return this.#onServerError(frame);
      default: return; // pong, and frame types of later versions
    }
  }

  #onConnected(frame) {
    this.#cancel("handshake");
    if (typeof frame.token_exp === "number") this.#exp = frame.token_exp; // the server knows best
    // A new connection may renew even the exp an interrupted renewal was tried for.
    this.#renewedExp = undefined;
    if (typeof frame.heartbeat_s === "number" && frame.heartbeat_s > 0) this.#heartbeatMs = frame.heartbeat_s * 1000;
    this.#setState("open");
    this.#emit("connected", frame);
    for (const [conversationId, sub] of this.#subs) {
      this.#sendSubscribe(conversationId, sub.last ?? sub.since);
    }
    for (const campaignId of this.#campaigns.keys()) this.#sendSubscribeCampaign(campaignId);
    this.#schedulePing();
    this.#scheduleRenewal();
  }

  /** A `status` or `message` frame: one seq stream per conversation, both kinds in it. */
  #onChange(frame) {
    const sub = this.#subs.get(frame?.conversation_id);
    // No subscription: unsubscribed while it travelled. No baseline yet: the subscribe's
    // answer (and replay) will bring it.
    if (!sub || sub.last === undefined || typeof frame.seq !== "number") return;
    if (frame.seq <= sub.last) return; // duplicate or stale
    if (frame.seq === sub.last + 1) {
      sub.last = frame.seq;
      this.#emit(frame.type === "message" ? "message" : "status", frame);
      return;
    }
    // A hole: frames after it are dropped, since the replay from `last` brings them in order.
    if (sub.repairRef) return;
    this.#emit("gap", { conversationId: frame.conversation_id, expected: sub.last + 1, received: frame.seq });
    sub.repairRef = this.#sendSubscribe(frame.conversation_id, sub.last);
  }

  #onSubscribed(frame) {
    const request = this.#refs.get(frame.ref);
    this.#refs.delete(frame.ref);
    const conversationId = frame.conversation_id;
    const sub = this.#subs.get(conversationId);
    if (!sub) return; // unsubscribed meanwhile
    if (sub.repairRef === frame.ref) sub.repairRef = null;
    const since = request?.since;
    if (!frame.recovered) {
      sub.last = frame.seq;
      this.#emit("subscribed", { conversationId, seq: frame.seq, recovered: false });
      this.#emit("reload", { conversationId, seq: frame.seq });
      return;
    }
    // With `since` the replay follows and advances `last` itself; without, only later
    // changes come.
    if (since !== undefined && since !== null) sub.last = Math.max(sub.last ?? since, since);
    else sub.last = frame.seq;
    this.#emit("subscribed", { conversationId, seq: frame.seq, recovered: true });
  }

  /** A campaign's counts: kept (and emitted) only when its version is above the last one's,
   * so counts never go back, even across a reconnect to another hub. */
  #onCampaign(frame) {
    if (frame.ref != null) this.#refs.delete(frame.ref);
    const campaignId = frame?.campaign_id;
    if (!this.#campaigns.has(campaignId) || typeof frame.version !== "number") return;
    const last = this.#campaigns.get(campaignId);
    if (last && frame.version <= last.version) return; // older or the same counts
    this.#campaigns.set(campaignId, frame);
    this.#emit("campaign", frame);
  }

  #onCampaignUnsubscribed(frame) {
    this.#refs.delete(frame.ref);
    const campaignId = frame.campaign_id;
    if (this.#campaigns.has(campaignId)) return; // followed again meanwhile
    this.#emit("campaignUnsubscribed", { campaignId });
  }

  #onUnsubscribed(frame) {
    this.#refs.delete(frame.ref);
    const conversationId = frame.conversation_id;
    // A late answer after the app subscribed again (a quick off/on) must not read as "off".
    if (this.#subs.has(conversationId)) return;
    this.#emit("unsubscribed", { conversationId });
  }

  #onServerError(frame) {
    const request = frame.ref != null ? this.#refs.get(frame.ref) : undefined;
    if (request) this.#refs.delete(frame.ref);
    const extra = { ref: frame.ref ?? null };
    if (request?.campaignId) {
      extra.campaignId = request.campaignId;
      // Asking again after a reconnect would be refused the same way.
      if (request.kind === "subscribe_campaign") this.#campaigns.delete(request.campaignId);
    }
    if (request?.messageId) extra.messageId = request.messageId;
    if (request?.conversationId) {
      extra.conversationId = request.conversationId;
      const sub = this.#subs.get(request.conversationId);
      if (sub && sub.repairRef === frame.ref) sub.repairRef = null;
      // Asking again after a reconnect would be refused the same way.
      if (request.kind === "subscribe" && (frame.code === "forbidden" || frame.code === "too_many_subscriptions")) {
        this.#subs.delete(request.conversationId);
      }
    }
    this.#error(String(frame.code ?? "protocol"), String(frame.message ?? ""), extra);
  }

  // --- heartbeat ---

  #schedulePing() {
    this.#timer("ping", this.#o.heartbeat.intervalMs ?? this.#heartbeatMs, () => {
      if (!this.#send({ type: "ping", ts: this.#timers.now() })) return;
      if (this.#t.pingTimeout === null) {
        this.#timer("pingTimeout", this.#o.heartbeat.timeoutMs, () => this.#onHeartbeatTimeout());
      }
      this.#schedulePing();
    });
  }

  #onHeartbeatTimeout() {
    // A half-open TCP connection may never fire `close`; stop waiting for it.
    this.#dropSocket("heartbeat timeout", `no frame for ${this.#o.heartbeat.timeoutMs} ms after a ping`);
  }

  #onHandshakeTimeout() {
    const message = `no connected frame ${this.#o.heartbeat.timeoutMs} ms after the attempt began`;
    if (this.#ws) {
      this.#dropSocket("handshake timeout", message);
      return;
    }
    // Still waiting for getToken: abandon that call, so that a late token cannot open a
    // second socket next to the retry's.
    this.#epoch++;
    this.#retryWithoutSocket("heartbeat_timeout", message);
  }

  /** Declares the current socket dead: close 4000 and reconnect, as if the server had. */
  #dropSocket(reason, message) {
    const epoch = this.#epoch;
    this.#error("heartbeat_timeout", message);
    if (epoch !== this.#epoch) return; // an error handler called disconnect()
    const ws = this.#ws;
    this.#onClose(HEARTBEAT_CLOSE, reason); // detaches before closing
    try { ws?.close(HEARTBEAT_CLOSE, reason); } catch { /* already closing */ }
  }

  // --- token renewal ---

  #scheduleRenewal() {
    this.#cancel("renew");
    if (!this.#o.getToken || this.#exp === undefined) return;
    const renewAt = (this.#exp - this.#o.renewBeforeS) * 1000;
    const delay = renewAt - this.#timers.now();
    if (delay <= 0 && this.#renewedExp === this.#exp) return; // the server closes 4001 then
    // #timer caps the delay (MAX_TIMER_MS): a timer that fires before renewAt re-arms.
    this.#timer("renew", delay, () => (this.#timers.now() < renewAt ? this.#scheduleRenewal() : this.#renew()));
  }

  async #renew() {
    const epoch = this.#epoch;
    const ws = this.#ws;
    this.#renewedExp = this.#exp;
    let token;
    try {
      token = await this.#o.getToken();
    } catch (err) {
      if (epoch !== this.#epoch || ws !== this.#ws) return; // that connection is gone anyway
      // The connection is still valid until exp: keep it and try again later. If no try
      // succeeds, the server closes 4001 and the reconnect fetches a token with back-off.
      this.#error("token_renewal_failed", `getToken failed: ${err?.message ?? err}`);
      if (epoch !== this.#epoch || ws !== this.#ws) return;
      const left = this.#exp * 1000 - this.#timers.now();
      if (left > RENEW_RETRY_MIN_MS) this.#timer("renew", Math.max(RENEW_RETRY_MIN_MS, left / 2), () => this.#renew());
      return;
    }
    // Keep the fresh token even if this connection is gone (disconnect(), connect()): the
    // next connection starts with it rather than with the one about to expire.
    this.#token = token;
    if (epoch !== this.#epoch || ws !== this.#ws) {
      this.#exp = tokenExp(token) ?? this.#exp;
      return;
    }
    this.#send({ type: "auth", token, ref: this.#ref({ kind: "auth" }) });
  }

  #onReadOk(frame) {
    this.#refs.delete(frame.ref);
    this.#emit("read", { conversationId: frame.conversation_id, messageId: frame.message_id });
  }

  #onAuthOk(frame) {
    this.#refs.delete(frame.ref);
    if (typeof frame.token_exp === "number") this.#exp = frame.token_exp;
    this.#scheduleRenewal();
  }
}
