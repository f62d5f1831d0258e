/**
 * Whatslike's browser client for `/ws/status` (docs/protocol.md §4): live message statuses
 * per conversation and campaigns' live counts, with reconnection, recovery by `seq`,
 * heartbeats and token renewal.
 */

export type ConnectionState = "idle" | "connecting" | "open" | "reconnecting" | "closed";

export type MessageStatus = "PENDING" | "SENT" | "DELIVERED" | "READ" | "FAILED";

export interface StatusFrame {
  type: "status";
  conversation_id: string;
  message_id: string;
  status: MessageStatus;
  seq: number;
  occurred_at: string;
  error: { code: string; title: string } | null;
}

/** A customer's message arrived: the first change of a message with `direction: "in"`,
 * in the same `seq` stream as the status frames (its later READ is a `status` frame). */
export interface MessageFrame {
  type: "message";
  conversation_id: string;
  message_id: string;
  direction: "in";
  text: string;
  status: MessageStatus;
  seq: number;
  occurred_at: string;
  /** Only when it carries a medium, fetched already: `stored` (get its URL with
   * `GET /api/media/{media_id}`) or `failed`; `text` is then its caption, maybe empty. */
  media?: InboundMedia;
}

/** A customer's medium (docs/protocol.md §4). */
export interface InboundMedia {
  kind: "image" | "document" | "audio" | "video";
  content_type: string;
  filename: string;
  state: "fetching" | "stored" | "failed";
  media_id: string | null;
  error: string | null;
}

/** A campaign's counts (docs/protocol.md §4, "Campaigns' live counts"): each recipient in
 * exactly one count. */
export interface CampaignCounts {
  waiting: number;
  queued: number;
  sent: number;
  delivered: number;
  read: number;
  failed: number;
  failed_by_code: Record<string, number>;
}

export interface CampaignFrame {
  type: "campaign";
  campaign_id: string;
  /** Grows with every move of the counts: a higher version is newer counts. */
  version: number;
  total: number;
  counts: CampaignCounts;
  /** Every message created and none queued. */
  finished: boolean;
  /** Only on the snapshot answering a subscribe. */
  ref?: string | number;
}

export interface ClientError {
  /** The server's code (`forbidden`, `bad_request`, `rate_limited`, `too_many_subscriptions`)
   * or the client's own: `token_expired`, `token_renewal_failed` (getToken rejected; not
   * terminal, see `getToken`), `reconnect_failed`, `heartbeat_timeout` (no frame after a
   * ping, or no `connected` within `heartbeat.timeoutMs` of an attempt's start), `protocol`
   * (also a `url` that cannot be parsed: terminal). */
  code: string;
  message: string;
  conversationId?: string;
  /** The campaign of a refused `subscribeCampaign` (which is then forgotten). */
  campaignId?: string;
  /** The message of a refused `markRead`. */
  messageId?: string;
  ref?: string | number | null;
}

export interface ClientEvents {
  /** Every change of connection state. */
  state: { state: ConnectionState; previous: ConnectionState };
  /** The server's `connected` frame. */
  connected: { connection_id: string; user_id: string; org_id: string; heartbeat_s: number; token_exp: number };
  /** A status, once per `seq`, in `seq` order per conversation (batches are unwrapped). */
  status: StatusFrame;
  /** A followed campaign's counts: the snapshot, then each change, only ever a higher
   * `version` (older or repeated ones are dropped); at most a few a second, the final
   * counts always among them. */
  campaign: CampaignFrame;
  /** The answer to an unsubscribeCampaign; not emitted when followed again meanwhile. */
  campaignUnsubscribed: { campaignId: string };
  /** A customer's message, in the same `seq` order as the statuses. */
  message: MessageFrame;
  /** The server took a `markRead`: the message is READ (its `status` frame follows for
   * the first read of it). */
  read: { conversationId: string; messageId: string };
  /** The answer to a subscribe (also after each automatic resubscribe). */
  subscribed: { conversationId: string; seq: number; recovered: boolean };
  /** The answer to an unsubscribe; not emitted when the conversation was subscribed again
   * before the answer came. */
  unsubscribed: { conversationId: string };
  /** The history could not be replayed (`recovered: false`): reload the conversation over
   * HTTP (`GET /api/conversations/{id}/messages`); live statuses continue after `seq`. */
  reload: { conversationId: string; seq: number };
  /** A missing `seq` was noticed on a live subscription and is being repaired. */
  gap: { conversationId: string; expected: number; received: number };
  /** Errors are events, never thrown. */
  error: ClientError;
  /** A socket closed; `willReconnect` tells whether the client will try again. */
  close: { code: number; reason: string; willReconnect: boolean };
  /** Every frame as received, before any processing (for logs and debugging). */
  frame: Record<string, unknown>;
  /** Every frame sent. */
  sent: Record<string, unknown>;
}

export interface ReconnectOptions {
  /** First back-off ceiling in ms (default 500). */
  baseMs?: number;
  /** Largest back-off in ms (default 15000). */
  capMs?: number;
  /** Attempts before giving up (default Infinity). */
  maxAttempts?: number;
  /** A connection open this long resets the attempt count (default 10000). */
  stableMs?: number;
}

export interface HeartbeatOptions {
  /** Ping interval in ms (default: the server's `heartbeat_s`). */
  intervalMs?: number;
  /** No frame for this long after a ping means the socket is dead (default 10000). Also
   * the time an attempt (getToken, upgrade, `connected`) may take before it is retried. */
  timeoutMs?: number;
}

export interface ChatStatusClientOptions {
  /** `ws://host/ws/status` (or `wss://`). */
  url: string;
  /** A token to start with; optional when `getToken` is given. */
  token?: string;
  /** Returns a fresh token; called before `token_exp`, after a 4001 close, and when a
   * connection attempt fails before opening (a refused upgrade looks like that). A rejection
   * is a `token_renewal_failed` error event, not the end: before connecting, the attempt is
   * retried with back-off (within `reconnect.maxAttempts`); while connected, the connection
   * is kept and the renewal retried at half the token's remaining life (at least 5 s apart),
   * and if none succeeds the server's 4001 close leads to a reconnect. */
  getToken?: () => Promise<string> | string;
  /** Seconds before `token_exp` to renew (default 60). */
  renewBeforeS?: number;
  reconnect?: ReconnectOptions;
  heartbeat?: HeartbeatOptions;
  /** For tests: a WebSocket constructor (default `globalThis.WebSocket`). */
  WebSocket?: unknown;
  /** For tests: the random source for jitter (default Math.random). */
  random?: () => number;
  /** For tests: timer functions (default the global ones, and Date.now). */
  timers?: {
    setTimeout: (fn: () => void, ms: number) => unknown;
    clearTimeout: (handle: unknown) => void;
    now: () => number;
  };
}

/** Offered on every upgrade: the server selects SUBPROTOCOL; the token travels as
 * TOKEN_SUBPROTOCOL_PREFIX + token, never in the URL (docs/protocol.md §4). */
export declare const SUBPROTOCOL: "whatslike.v1";
export declare const TOKEN_SUBPROTOCOL_PREFIX: "access_token.";

/** Close codes of docs/protocol.md §4. */
export declare const CloseCode: {
  readonly NORMAL: 1000;
  readonly GOING_AWAY: 1001;
  readonly POLICY: 1008;
  readonly TOO_BIG: 1009;
  readonly TOKEN_EXPIRED: 4001;
  readonly RATE_LIMITED: 4008;
  readonly SLOW_CONSUMER: 4009;
};

/** Exponential back-off with full jitter: uniform in [0, min(capMs, baseMs * 2^attempt)). */
export declare function backoffDelay(
  attempt: number,
  baseMs: number,
  capMs: number,
  random?: () => number,
): number;

export declare class ChatStatusClient {
  constructor(options: ChatStatusClientOptions);
  readonly state: ConnectionState;
  /** Highest `seq` delivered per conversation. */
  lastSeq(conversationId: string): number | undefined;
  /** Opens the socket; resolves when `connected` arrives (or when the client gives up
   * for good: check `state`), rejects never (errors are events); a no-op when already
   * open or connecting. */
  connect(): Promise<void>;
  /** Follows a conversation; `since` asks for the frames after it. Kept across
   * reconnects, which resubscribe with `since` = the last seq seen. */
  subscribe(conversationId: string, options?: { since?: number }): void;
  unsubscribe(conversationId: string): void;
  /** Follows a campaign's live counts (`campaign` events). Kept across reconnects, which
   * subscribe again (a snapshot older than the counts already seen is dropped). A refused
   * subscribe (`forbidden`: not a campaign of the organization) is an `error` event with
   * `campaignId`, and the campaign is forgotten. */
  subscribeCampaign(campaignId: string): void;
  unsubscribeCampaign(campaignId: string): void;
  /** The latest counts of a followed campaign, or undefined before its snapshot. */
  campaign(campaignId: string): CampaignFrame | undefined;
  /** Marks a customer's message read over the socket (`{"type":"read"}`); false when not
   * open. Answered by a `read` event, or an `error` event with `messageId`. */
  markRead(conversationId: string, messageId: string): boolean;
  on<K extends keyof ClientEvents>(event: K, handler: (payload: ClientEvents[K]) => void): this;
  off<K extends keyof ClientEvents>(event: K, handler: (payload: ClientEvents[K]) => void): this;
  /** Closes with 1000 and stops reconnecting. */
  disconnect(): void;
}
