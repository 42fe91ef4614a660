// chatmesh.js: the client library of chatmesh's websocket protocol.
//
// One ES module, no dependencies, no build step. The pages of a chatmesh node load it
// from /static/chatmesh.js; an app may load it from there or copy this file.
//
//   import { ChatClient, dmConv } from '/static/chatmesh.js';
//   const chat = new ChatClient({ url: 'wss://chat.example/ws', token: jwt });
//   chat.on('message', ({ message }) => show(message));
//   chat.connect();
//   await chat.send(dmConv(chat.uid, 'bob'), 'hi').sent;
//
// What it does for the app (contract sections 3, 7 and 8):
//   - connects with a token (JWT mode) or a uid (development mode); reconnects with
//     jittered exponential backoff, and at once when the server closes with 1012;
//     when a connection is refused before it opens, asks GET /session why and reports
//     `unauthorized` with the server's reason instead of retrying forever;
//   - keeps a cursor per conversation that only advances over contiguous seqs, fills
//     gaps with `history`, answers `resync` with `sync`, and syncs again with cursors
//     while `synced.more` is not empty; drops cursors and cached messages that came
//     with another `epoch` and syncs from scratch;
//   - keeps an outbox in storage (per user) that survives page reloads: unconfirmed
//     sends, edits and deletes go again with the same `client_id` after a reconnect
//     (the server stores them once);
//   - deduplicates messages by (conv, seq), applies edits and deletes, keeps an inbox
//     (newest first, last message, unread count), read/delivered marks and receipts,
//     typing indicators, presence subscriptions, and room operations;
//   - tells the app what happened through events (`on(type, fn)`).
//
// The server answers the requests of one connection in order, one at a time. The
// library therefore matches answers to requests in the order it sent them; frames that
// are not answers (live messages, presence and mark events, `resync`) are handled as
// they come. It sends at most `rate.perSecond` frames a second (below the server's
// limit), queueing the rest.
//
// Storage and WebSocket are injectable (`storage`, `WebSocket`, `fetch` options), so
// the library runs in browsers and under Node (with the `ws` package).

/**
 * A stored message as the server sends it (contract section 3 and 8).
 * @typedef {object} Message
 * @property {string} conv   conversation id: `dm:A:B` or `room:R`
 * @property {number} seq    per conversation, from 1, gap-free
 * @property {string} id
 * @property {string} from
 * @property {string} [to]    DMs: the other participant
 * @property {string} [room]  rooms: the room
 * @property {string} [body]  absent on a deleted message
 * @property {number} ts      milliseconds since the Unix epoch
 * @property {number} [edit]   an edit event: the seq it changes
 * @property {number} [delete] a delete event: the seq it deletes
 * @property {boolean} [edited]
 * @property {boolean} [deleted]
 */

/**
 * An unconfirmed send, edit or delete in the outbox.
 * @typedef {object} OutboxEntry
 * @property {string} clientId
 * @property {'send'|'edit'|'delete'} kind
 * @property {string} conv
 * @property {string} [body]
 * @property {number} [target]  edit/delete: the seq it changes
 * @property {number} created   ms since the epoch
 * @property {number} tries
 */

/**
 * One conversation of the inbox.
 * @typedef {object} InboxItem
 * @property {string} conv
 * @property {string} [with]   DMs: the other participant
 * @property {string} [room]   rooms: the room
 * @property {Message|null} last  the newest message (may be an edit or delete event)
 * @property {number} read    the user's read mark
 * @property {number} unread  messages from others above the read mark
 */

/**
 * Options of a ChatClient.
 * @typedef {object} ChatClientOptions
 * @property {string} url   the websocket URL, e.g. `wss://host/ws`
 * @property {string} [uid]  development mode: connect as this user (`?uid=`)
 * @property {string|(() => string|Promise<string>)} [token]  JWT mode (`?token=`); a
 *   function is called before every connection attempt (to refresh it)
 * @property {string} [sessionUrl]  where to ask why a connection was refused
 *   (default: the `/session` route of the same host)
 * @property {{getItem(k: string): (string|null), setItem(k: string, v: string): void,
 *   removeItem(k: string): void}|null} [storage]  default: `localStorage` if there is
 *   one, else memory; `null`: memory
 * @property {string} [storagePrefix]  default `chatmesh`
 * @property {any} [WebSocket]  a WebSocket constructor (default: the global one)
 * @property {any} [fetch]  a fetch function (default: the global one)
 * @property {{min?: number, max?: number}} [backoff]  reconnect delays in ms
 *   (default 500 .. 30000, doubled per attempt, jittered)
 * @property {{perSecond?: number, burst?: number}} [rate]  frames sent per second
 *   (default 40, bursts of 80)
 * @property {number} [maxBodyBytes]  longest body (default 4096, the server's default)
 * @property {number} [typingEvery]  send `typing` at most this often, ms (default 3000)
 * @property {number} [typingTimeout]  forget others' typing after this, ms (default 5000)
 * @property {number} [gapDelay]  wait this long for a missing seq before asking
 *   `history` for it, ms (default 250)
 * @property {number} [requestTimeout]  ms (default 30000)
 * @property {boolean} [autoDelivered]  send `delivered` marks for what arrived
 *   (default true)
 * @property {() => number} [random]  default Math.random (jitter)
 */

const DEFAULTS = {
  storagePrefix: 'chatmesh',
  backoff: { min: 500, max: 30000 },
  rate: { perSecond: 40, burst: 80 },
  maxBodyBytes: 4096,
  typingEvery: 3000,
  typingTimeout: 5000,
  gapDelay: 250,
  requestTimeout: 30000,
  autoDelivered: true,
  historyLimit: 50,
};

/** Most messages a `history` request may ask for (contract). */
export const MAX_HISTORY = 100;
/** Most uids one connection may subscribe to (contract). */
export const MAX_PRESENCE = 100;

const ID_RE = /^[A-Za-z0-9_.-]{1,64}$/;

/** Whether `id` is a valid user or room id (1 to 64 of `A-Z a-z 0-9 _ . -`). */
export function validId(id) {
  return typeof id === 'string' && ID_RE.test(id);
}

/** The conversation id of a DM between `a` and `b`: `dm:A:B` with A < B in byte order. */
export function dmConv(a, b) {
  return a < b ? 'dm:' + a + ':' + b : 'dm:' + b + ':' + a;
}

/** The conversation id of a room. */
export function roomConv(room) {
  return 'room:' + room;
}

/**
 * Parses a conversation id.
 * @param {string} conv
 * @returns {{kind: 'dm', a: string, b: string} | {kind: 'room', room: string} | null}
 */
export function parseConv(conv) {
  if (typeof conv !== 'string') return null;
  if (conv.startsWith('room:')) {
    const room = conv.slice(5);
    return validId(room) ? { kind: 'room', room } : null;
  }
  if (!conv.startsWith('dm:')) return null;
  const parts = conv.slice(3).split(':');
  if (parts.length !== 2 || !validId(parts[0]) || !validId(parts[1])) return null;
  if (!(parts[0] < parts[1])) return null;
  return { kind: 'dm', a: parts[0], b: parts[1] };
}

/** The other participant of DM `conv` for user `me`, or null (rooms, not mine). */
export function peerOf(conv, me) {
  const p = parseConv(conv);
  if (!p || p.kind !== 'dm') return null;
  if (p.a === me) return p.b;
  if (p.b === me) return p.a;
  return null;
}

/** Whether a message is an edit or delete event rather than a message of its own. */
export function isEvent(m) {
  return !!m && (m.edit != null || m.delete != null);
}

/** An error the server (or the library) gave: `code` is a contract error code, or
 * `disconnected`, `timeout`, `closed`, `not_ready`, `epoch`. */
export class ChatError extends Error {
  /** @param {string} code @param {string} [message] */
  constructor(code, message) {
    super(message || code);
    this.name = 'ChatError';
    this.code = code;
  }
}

/** A small event emitter: `on(type, fn)` returns a function that removes `fn`. */
export class Emitter {
  constructor() {
    /** @type {Map<string, Set<Function>>} */
    this._handlers = new Map();
  }
  /** @param {string} type @param {(detail: any) => void} fn @returns {() => void} */
  on(type, fn) {
    let set = this._handlers.get(type);
    if (!set) this._handlers.set(type, (set = new Set()));
    set.add(fn);
    return () => this.off(type, fn);
  }
  /** @param {string} type @param {Function} fn */
  off(type, fn) {
    const set = this._handlers.get(type);
    if (set) set.delete(fn);
  }
  /** Like `on`, for one call. */
  once(type, fn) {
    const off = this.on(type, (d) => {
      off();
      fn(d);
    });
    return off;
  }
  /** Calls the handlers of `type` (and of `*`, with `{type, detail}`). A handler that
   * throws does not stop the others; the error is reported asynchronously. */
  emit(type, detail) {
    const call = (fn, arg) => {
      try {
        fn(arg);
      } catch (e) {
        setTimeout(() => {
          throw e;
        }, 0);
      }
    };
    const set = this._handlers.get(type);
    if (set) for (const fn of Array.from(set)) call(fn, detail);
    const all = this._handlers.get('*');
    if (all) for (const fn of Array.from(all)) call(fn, { type, detail });
  }
}

/** Storage in memory (same interface as localStorage). Share one between two
 * ChatClients to simulate a page reload. */
export class MemoryStorage {
  constructor() {
    this.map = new Map();
  }
  getItem(k) {
    return this.map.has(k) ? this.map.get(k) : null;
  }
  setItem(k, v) {
    this.map.set(k, String(v));
  }
  removeItem(k) {
    this.map.delete(k);
  }
}

function defaultStorage() {
  try {
    if (typeof localStorage !== 'undefined' && localStorage) {
      const probe = '__chatmesh_probe__';
      localStorage.setItem(probe, '1');
      localStorage.removeItem(probe);
      return localStorage;
    }
  } catch (e) {
    /* disabled (private mode, sandbox): memory */
  }
  return new MemoryStorage();
}

function newClientId() {
  const c = globalThis.crypto;
  if (c && typeof c.randomUUID === 'function') return c.randomUUID();
  const bytes = new Uint8Array(16);
  if (c && typeof c.getRandomValues === 'function') c.getRandomValues(bytes);
  else for (let i = 0; i < 16; i++) bytes[i] = Math.floor(Math.random() * 256);
  return Array.from(bytes, (b) => (b + 256).toString(16).slice(1)).join('');
}

function byteLength(s) {
  if (typeof TextEncoder === 'function') return new TextEncoder().encode(s).length;
  return unescape(encodeURIComponent(s)).length;
}

function copyMessage(m) {
  const out = {
    conv: m.conv,
    seq: m.seq,
    id: typeof m.id === 'string' ? m.id : '',
    from: typeof m.from === 'string' ? m.from : '',
    ts: typeof m.ts === 'number' ? m.ts : 0,
  };
  if (typeof m.to === 'string') out.to = m.to;
  if (typeof m.room === 'string') out.room = m.room;
  if (typeof m.body === 'string') out.body = m.body;
  if (typeof m.edit === 'number') out.edit = m.edit;
  if (typeof m.delete === 'number') out.delete = m.delete;
  if (m.edited) out.edited = true;
  if (m.deleted) out.deleted = true;
  return out;
}

const NO = 0; // not this request's answer
const MORE = 1; // part of its answer; more to come
const DONE = 2; // its (last) answer

/**
 * A chatmesh connection with everything the protocol asks of a client.
 *
 * State (`client.state`): `idle` (not started), `connecting`, `open` (welcomed),
 * `reconnecting` (waiting to try again), `unauthorized` (credentials refused; see the
 * `unauthorized` event), `closed` (after `close()`).
 *
 * Events (`client.on(type, fn)`; `*` gets all as `{type, detail}`):
 * - `status` `{state, attempt, delay?, code?, reason?}`: the connection changed
 * - `welcome` `{uid, node, epoch, rooms}`: a connection was accepted
 * - `reset` `{epoch, previous}`: the database changed (new epoch): every cached
 *   message, cursor, mark and inbox entry was dropped; redraw from scratch
 * - `message` `{message, source, clientId?}`: a message not seen before (`source`:
 *   `live`, `history`, `sent`); edit and delete events are not `message`s, see `update`
 * - `update` `{message, by}`: a message was edited or deleted (`message` is its new state)
 * - `pending` `{entry}`: a send, edit or delete was put in the outbox (also for
 *   entries restored from storage)
 * - `sent` `{clientId, entry, message}`: the server stored it
 * - `failed` `{clientId, entry, error}`: the server refused it for good
 * - `typing` `{conv, uid, active}`: someone started or stopped typing
 * - `receipt` `{kind, conv, uid, seq}`: a read or delivered mark moved
 * - `receipts` `{conv}`: the receipts of `conv` were loaded (`client.receipts(conv)`)
 * - `presence` `{uid, online, room?}`
 * - `room` `{room, joined, by?, role?, private?}`: this user joined or left a room
 *   (including being added or removed by an owner: `by`)
 * - `member` `{room, uid, added, role?, ban?}`: this user added or removed someone
 * - `inbox` `{conversations}`: the inbox changed (see `conversations()`)
 * - `syncing`, `synced` `{rounds}`: a sync started / caught up
 * - `resync`: the server asked for a sync (answered automatically)
 * - `gap` `{conv, after, before}`: a gap was seen and is being filled with `history`
 * - `error` `{code, message, frame?}`: an error that answers no promise
 * - `unauthorized` `{message}`: the credentials were refused; no more reconnects
 */
export class ChatClient extends Emitter {
  /** @param {ChatClientOptions} options */
  constructor(options) {
    super();
    const o = options || /** @type {any} */ ({});
    if (!o.url) throw new TypeError('ChatClient: options.url (the websocket URL) is required');
    if (!o.uid && !o.token) throw new TypeError('ChatClient: give options.uid or options.token');
    this.options = {
      ...DEFAULTS,
      ...o,
      backoff: { ...DEFAULTS.backoff, ...(o.backoff || {}) },
      rate: { ...DEFAULTS.rate, ...(o.rate || {}) },
    };
    this.url = o.url;
    this.sessionUrl = o.sessionUrl || sessionUrlOf(o.url);
    this._token = o.token || null;
    /** The user: known at once with `uid`, after the first welcome with a token. */
    this.uid = o.uid || null;
    this.storage = o.storage === undefined ? defaultStorage() : o.storage || new MemoryStorage();
    this.WebSocket = o.WebSocket || globalThis.WebSocket;
    this.fetch = o.fetch || (typeof globalThis.fetch === 'function' ? globalThis.fetch.bind(globalThis) : null);
    this.random = o.random || Math.random;
    if (!this.WebSocket) throw new TypeError('ChatClient: no WebSocket (pass options.WebSocket)');

    /** @type {'idle'|'connecting'|'open'|'reconnecting'|'unauthorized'|'closed'} */
    this.state = 'idle';
    /** The epoch of the database the cursors came from. */
    this.epoch = null;
    /** The node of the current connection. */
    this.node = null;
    /** The rooms this user belongs to. @type {Set<string>} */
    this.rooms = new Set();
    /** Reconnect attempts since the last welcome. */
    this.attempt = 0;

    this._ws = null;
    this._convs = new Map();
    /** @type {OutboxEntry[]} */
    this._outbox = [];
    this._outboxDone = new Set();
    this._inflight = [];
    this._waiting = [];
    this._writeQueue = [];
    this._tokens = this.options.rate.burst;
    this._tokensAt = Date.now();
    this._writeTimer = null;
    this._reconnectTimer = null;
    this._saveTimer = null;
    this._retryTimer = null;
    this._inboxTimer = null;
    this._inbox = new Map();
    this._inboxWanted = false;
    this._inboxEmitSoon = false;
    this._online = new Map();
    this._roomOnline = new Map();
    this._subscribed = new Set();
    this._syncing = false;
    this._syncAgain = false;
    this._welcomed = false;
    this._loadedFor = null;
    this._closing = false;
    this._gen = 0;
    this._hadWelcome = false;
    this._stats = { syncs: 0, histories: 0, gaps: 0, resyncs: 0, resets: 0 };
    if (this.uid) this._load();
  }

  // ------------------------------------------------------------------ connection

  /** Starts connecting (and keeps reconnecting until `close()`). */
  connect() {
    if (this.state === 'closed') this._closing = false;
    if (this._ws || this._reconnectTimer) return;
    this._open();
  }

  /** Closes the connection for good (no more reconnects), saves what is to be saved. */
  close() {
    this._closing = true;
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
    this._flushSave();
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      try {
        ws.close(1000, 'client closed');
      } catch (e) {
        /* already closing */
      }
    }
    this._dropConnection(new ChatError('closed', 'the client was closed'));
    this._clearTimers();
    this._setState('closed', {});
  }

  /** Reconnects now (e.g. when the browser says it is online again). */
  reconnectNow() {
    if (this._closing) return;
    if (this._ws) return;
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
    this._open();
  }

  /** Drops the current connection (it reconnects by itself). For tests and "retry". */
  dropConnection(code) {
    if (this._ws) {
      try {
        this._ws.close(code || 4000, 'dropped by the client');
      } catch (e) {
        /* ignore */
      }
    }
  }

  async _url() {
    let q;
    if (this._token) {
      const t = typeof this._token === 'function' ? await this._token() : this._token;
      q = 'token=' + encodeURIComponent(t);
    } else {
      q = 'uid=' + encodeURIComponent(this.uid);
    }
    return this.url + (this.url.includes('?') ? '&' : '?') + q;
  }

  async _open() {
    if (this._closing) return;
    this._setState(this.attempt ? 'reconnecting' : 'connecting', { attempt: this.attempt });
    let url;
    try {
      url = await this._url();
    } catch (e) {
      this._scheduleReconnect(false);
      return;
    }
    if (this._closing || this._ws) return;
    let ws;
    try {
      ws = new this.WebSocket(url);
    } catch (e) {
      this._scheduleReconnect(false);
      return;
    }
    this._ws = ws;
    let opened = false;
    ws.onopen = () => {
      opened = true;
    };
    ws.onmessage = (ev) => {
      if (ws !== this._ws) return;
      let f;
      try {
        f = JSON.parse(typeof ev.data === 'string' ? ev.data : String(ev.data));
      } catch (e) {
        return;
      }
      if (f && typeof f === 'object' && typeof f.type === 'string') this._onFrame(f);
    };
    ws.onerror = () => {
      /* onclose follows */
    };
    ws.onclose = (ev) => {
      if (ws !== this._ws) return;
      this._ws = null;
      const code = ev && typeof ev.code === 'number' ? ev.code : 1006;
      this._dropConnection(new ChatError('disconnected', 'the connection closed (' + code + ')'));
      if (this._closing) return;
      if (!opened) this._refused();
      else this._scheduleReconnect(code === 1012, code, ev && ev.reason);
    };
  }

  /** A connection that never opened: were the credentials refused? */
  async _refused() {
    let reason = null;
    if (this.fetch) {
      try {
        const r = await this.fetch(await this._sessionQuery());
        if (r.status === 401) {
          let body = null;
          try {
            body = await r.json();
          } catch (e) {
            /* no JSON */
          }
          reason = (body && body.message) || 'unauthorized';
        }
      } catch (e) {
        /* the node is not reachable: just try again later */
      }
    }
    if (this._closing || this._ws) return;
    if (reason != null && typeof this._token !== 'function') {
      this._setState('unauthorized', { reason });
      this.emit('unauthorized', { message: reason });
      return;
    }
    this._scheduleReconnect(false, 1006, reason || undefined);
  }

  async _sessionQuery() {
    const u = await this._url();
    const q = u.slice(u.indexOf('?'));
    return this.sessionUrl + q;
  }

  /**
   * Asks the node whom these credentials are for (GET /session): `{uid}` or
   * `{error, message}` (why they are refused).
   * @returns {Promise<{ok: boolean, uid?: string, message?: string}>}
   */
  async checkSession() {
    if (!this.fetch) throw new ChatError('not_ready', 'no fetch function');
    const r = await this.fetch(await this._sessionQuery());
    let body = {};
    try {
      body = await r.json();
    } catch (e) {
      /* not JSON */
    }
    if (r.status === 200 && body && typeof body.uid === 'string') return { ok: true, uid: body.uid };
    return { ok: false, message: (body && body.message) || 'HTTP ' + r.status };
  }

  _scheduleReconnect(now, code, reason) {
    if (this._closing || this._reconnectTimer) return;
    let delay = 0;
    if (!now) {
      const { min, max } = this.options.backoff;
      const base = Math.min(max, min * Math.pow(2, this.attempt));
      delay = Math.round(base / 2 + this.random() * (base / 2));
      this.attempt++;
    }
    this._setState('reconnecting', { attempt: this.attempt, delay, code, reason });
    this._reconnectTimer = setTimeout(() => {
      this._reconnectTimer = null;
      this._open();
    }, delay);
  }

  _setState(state, extra) {
    this.state = state;
    this.emit('status', { state, attempt: this.attempt, ...extra });
  }

  /** Forgets the connection: requests in flight fail or wait for the next one. */
  _dropConnection(error) {
    this._welcomed = false;
    this._syncing = false;
    this._syncAgain = false;
    clearTimeout(this._writeTimer);
    this._writeTimer = null;
    this._writeQueue = [];
    const inflight = this._inflight;
    this._inflight = [];
    const again = [];
    for (const req of inflight) {
      clearTimeout(req.timer);
      if (req.kind === 'outbox' || req.silent) continue;
      if (req.retry && !req.internal && !this._closing) again.push(req);
      else req.reject(error);
    }
    this._waiting = again.concat(this._waiting);
    if (this._closing) {
      for (const req of this._waiting) req.reject(error);
      this._waiting = [];
    }
    for (const c of this._convs.values()) {
      c.fill = false;
      clearTimeout(c.gapTimer);
      c.gapTimer = null;
      for (const uid of Array.from(c.typing.keys())) this._typingOff(c, uid);
    }
    const known = Array.from(this._online.keys());
    this._online.clear();
    this._roomOnline.clear();
    for (const uid of known) this.emit('presence', { uid, online: undefined });
  }

  _clearTimers() {
    clearTimeout(this._saveTimer);
    clearTimeout(this._retryTimer);
    clearTimeout(this._inboxTimer);
    clearTimeout(this._writeTimer);
    this._saveTimer = this._retryTimer = this._inboxTimer = this._writeTimer = null;
    for (const c of this._convs.values()) {
      clearTimeout(c.gapTimer);
      clearTimeout(c.deliveredTimer);
      for (const t of c.typing.values()) clearTimeout(t);
      c.typing.clear();
    }
  }

  // ------------------------------------------------------------------ writing

  /** Queues a frame; frames leave in order, at most `rate.perSecond` a second. */
  _write(frame) {
    this._writeQueue.push(JSON.stringify(frame));
    this._pumpWrites();
  }

  _pumpWrites() {
    const ws = this._ws;
    if (!ws || this._writeTimer) return;
    const { perSecond, burst } = this.options.rate;
    const now = Date.now();
    this._tokens = Math.min(burst, this._tokens + ((now - this._tokensAt) / 1000) * perSecond);
    this._tokensAt = now;
    while (this._writeQueue.length && this._tokens >= 1) {
      const text = this._writeQueue.shift();
      this._tokens -= 1;
      try {
        ws.send(text);
      } catch (e) {
        return; // closing: onclose cleans up
      }
    }
    if (this._writeQueue.length) {
      const wait = Math.ceil(((1 - this._tokens) / perSecond) * 1000);
      this._writeTimer = setTimeout(() => {
        this._writeTimer = null;
        this._pumpWrites();
      }, Math.max(wait, 5));
    }
  }

  /**
   * Sends a request whose answer `match` recognises. Requests made while not
   * connected wait for the connection (`retry`: also those cut off by a disconnect).
   */
  _request(frame, match, opts) {
    const o = opts || {};
    return new Promise((resolve, reject) => {
      const req = {
        frame,
        match,
        resolve,
        reject,
        retry: o.retry !== false,
        internal: !!o.internal,
        silent: false,
        kind: 'request',
        timer: null,
      };
      if (!this._welcomed) {
        if (req.internal) return reject(new ChatError('disconnected', 'not connected'));
        if (this._closing) return reject(new ChatError('closed', 'the client was closed'));
        this._waiting.push(req);
        return;
      }
      this._dispatch(req);
    });
  }

  _dispatch(req) {
    req.timer = setTimeout(() => this._timedOut(req), this.options.requestTimeout);
    this._inflight.push(req);
    this._write(req.frame);
  }

  /** A frame the server answers with nothing on success (marks, typing). */
  _silent(frame) {
    if (!this._welcomed) return false;
    const req = { frame, silent: true, kind: 'silent', timer: null };
    req.timer = setTimeout(() => this._forget(req), this.options.requestTimeout);
    this._inflight.push(req);
    this._write(frame);
    return true;
  }

  _forget(req) {
    clearTimeout(req.timer);
    const i = this._inflight.indexOf(req);
    if (i >= 0) this._inflight.splice(i, 1);
  }

  _timedOut(req) {
    if (this._inflight.indexOf(req) < 0) return;
    this._forget(req);
    req.reject(new ChatError('timeout', 'no answer to ' + req.frame.type));
    // Answers come in order: one that never came means the connection is not sane.
    this.dropConnection(4001);
  }

  /** Matches `f` to the request it answers, if any. */
  _answer(f) {
    if (f.type === 'error') {
      if (f.client_id != null) return; // outbox (see _onError)
      // Not in order: refusals of frames the server did not queue.
      if (f.code === 'rate_limited' || f.code === 'bad_json' || f.code === 'unknown_type' || f.code === 'unsupported') return;
      const i = this._inflight.findIndex((r) => r.kind !== 'outbox');
      if (i < 0) {
        this.emit('error', { code: f.code, message: f.message });
        return;
      }
      const req = this._inflight[i];
      this._resolveSilentBefore(i);
      this._forget(req);
      if (req.silent) this.emit('error', { code: f.code, message: f.message, frame: req.frame });
      else req.reject(new ChatError(f.code, f.message));
      return;
    }
    for (let i = 0; i < this._inflight.length; i++) {
      const req = this._inflight[i];
      if (req.silent || req.kind === 'outbox') continue;
      const r = req.match(f, req);
      if (r === NO) continue;
      this._resolveSilentBefore(i);
      if (r === DONE) {
        this._forget(req);
        req.resolve(req.value !== undefined ? req.value : f);
      }
      return;
    }
  }

  _resolveSilentBefore(i) {
    const before = this._inflight.slice(0, i).filter((r) => r.silent);
    for (const r of before) this._forget(r);
  }

  // ------------------------------------------------------------------ frames in

  _onFrame(f) {
    switch (f.type) {
      case 'welcome':
        this._onWelcome(f);
        return;
      case 'message':
        this._ingest(f, 'live');
        break;
      case 'sent':
        this._onSent(f);
        break;
      case 'error':
        this._onError(f);
        break;
      case 'joined':
        this._onJoined(f);
        break;
      case 'left':
        this._onLeft(f);
        break;
      case 'added':
        this.emit('member', { room: f.room, uid: f.uid, added: true, role: f.role });
        break;
      case 'removed':
        this.emit('member', { room: f.room, uid: f.uid, added: false, ban: !!f.ban });
        break;
      case 'presence':
        this._onPresence(f);
        break;
      case 'read':
      case 'delivered':
        this._onMark(f);
        break;
      case 'typing':
        this._onTyping(f);
        break;
      case 'resync':
        this._stats.resyncs++;
        this.emit('resync', {});
        this._startSync();
        break;
      default:
        break;
    }
    this._answer(f);
  }

  _onWelcome(f) {
    if (typeof f.uid !== 'string') return;
    if (this.uid && f.uid !== this.uid) {
      // Another user (a token for someone else): nothing of the old one applies.
      this._resetAll();
      this._outbox = [];
      this.uid = f.uid;
      this._loadedFor = null;
    }
    this.uid = f.uid;
    if (this._loadedFor !== this.uid) this._load();
    const previous = this.epoch;
    if (previous && f.epoch && previous !== f.epoch) this._reset(f.epoch, previous);
    this.epoch = f.epoch || this.epoch;
    this.node = f.node || null;
    this._saveSoon();
    const rooms = new Set(Array.isArray(f.rooms) ? f.rooms.filter((r) => typeof r === 'string') : []);
    const had = this.rooms;
    this.rooms = rooms;
    this._welcomed = true;
    this._gen++;
    this.attempt = 0;
    this._tokens = this.options.rate.burst;
    this._tokensAt = Date.now();
    this._setState('open', { node: this.node });
    this.emit('welcome', { uid: this.uid, node: this.node, epoch: this.epoch, rooms: Array.from(rooms) });
    if (this._hadWelcome) {
      for (const r of rooms) if (!had.has(r)) this.emit('room', { room: r, joined: true });
      for (const r of had) {
        if (!rooms.has(r)) {
          this._inbox.delete(roomConv(r));
          this.emit('room', { room: r, joined: false });
        }
      }
    }
    this._hadWelcome = true;
    for (const r of rooms) this._inboxEnsure(roomConv(r));
    this._startSync();
    if (this._inboxWanted) this._refreshInbox();
    this._resubscribe();
    this._flushOutbox(true);
    const waiting = this._waiting;
    this._waiting = [];
    for (const req of waiting) this._dispatch(req);
  }

  // ------------------------------------------------------------------ storage

  _key(what) {
    return this.options.storagePrefix + ':' + this.uid + ':' + what;
  }

  _read(what) {
    try {
      const v = JSON.parse(this.storage.getItem(this._key(what)));
      return v && typeof v === 'object' ? v : null;
    } catch (e) {
      return null;
    }
  }

  _store(what, value) {
    try {
      if (value == null) this.storage.removeItem(this._key(what));
      else this.storage.setItem(this._key(what), JSON.stringify(value));
    } catch (e) {
      /* full or disabled: the client still works, it just forgets on reload */
    }
  }

  /** Loads the cursors, epoch and outbox of `this.uid`. */
  _load() {
    this._loadedFor = this.uid;
    const s = this._read('sync');
    if (s && typeof s.epoch === 'string') {
      this.epoch = s.epoch;
      const cursors = s.cursors && typeof s.cursors === 'object' ? s.cursors : {};
      for (const conv of Object.keys(cursors)) {
        const n = cursors[conv];
        if (parseConv(conv) && Number.isInteger(n) && n > 0) {
          const c = this._conv(conv);
          if (!c.cursor) c.cursor = n;
        }
      }
    }
    const stored = this._read('outbox');
    const list = Array.isArray(stored) ? stored : [];
    const have = new Set(this._outbox.map((e) => e.clientId));
    const restored = [];
    for (const e of list) {
      if (!e || typeof e.clientId !== 'string' || have.has(e.clientId) || !parseConv(e.conv)) continue;
      if (!['send', 'edit', 'delete'].includes(e.kind)) continue;
      const entry = {
        clientId: e.clientId,
        kind: e.kind,
        conv: e.conv,
        body: typeof e.body === 'string' ? e.body : undefined,
        target: typeof e.target === 'number' ? e.target : undefined,
        created: typeof e.created === 'number' ? e.created : Date.now(),
        tries: 0,
      };
      restored.push(entry);
    }
    this._outbox = restored.concat(this._outbox).sort((a, b) => a.created - b.created);
    for (const entry of restored) this.emit('pending', { entry, restored: true });
    if (restored.length) this._saveOutbox();
  }

  _saveSoon() {
    if (this._saveTimer || !this.uid) return;
    this._saveTimer = setTimeout(() => {
      this._saveTimer = null;
      this._saveSync();
    }, 200);
  }

  _flushSave() {
    if (this._saveTimer) {
      clearTimeout(this._saveTimer);
      this._saveTimer = null;
      this._saveSync();
    }
  }

  _saveSync() {
    if (!this.uid || !this.epoch) return;
    const cursors = {};
    for (const c of this._convs.values()) if (c.cursor > 0) cursors[c.conv] = c.cursor;
    this._store('sync', { epoch: this.epoch, cursors });
  }

  /** Remembers a client_id this client confirmed or gave up (the last 1,000), so a
   * save does not bring it back from what another tab stored. */
  _done(clientId) {
    this._outboxDone.add(clientId);
    if (this._outboxDone.size > 1000) this._outboxDone.delete(this._outboxDone.values().next().value);
  }

  /** Writes the outbox, keeping what other tabs of the same user put there. */
  _saveOutbox() {
    if (!this.uid) return;
    const mine = new Set(this._outbox.map((e) => e.clientId));
    const stored = this._read('outbox');
    const others = (Array.isArray(stored) ? stored : []).filter(
      (e) => e && typeof e.clientId === 'string' && !mine.has(e.clientId) && !this._outboxDone.has(e.clientId),
    );
    const list = others.concat(
      this._outbox.map((e) => ({
        clientId: e.clientId,
        kind: e.kind,
        conv: e.conv,
        body: e.body,
        target: e.target,
        created: e.created,
      })),
    );
    this._store('outbox', list.length ? list : null);
  }

  // ------------------------------------------------------------------ conversations

  _conv(conv) {
    let c = this._convs.get(conv);
    if (!c) {
      c = {
        conv,
        cursor: 0,
        ahead: new Set(),
        messages: new Map(),
        changes: new Map(),
        maxSeq: 0,
        fill: false,
        gapTimer: null,
        deliveredTimer: null,
        readSent: 0,
        deliveredSent: 0,
        deliverDue: false,
        typingSent: 0,
        typing: new Map(),
        receipts: { read: {}, delivered: {} },
        receiptsLoaded: false,
        hasOlder: null,
        latestLoaded: false,
      };
      this._convs.set(conv, c);
    }
    return c;
  }

  /** Drops everything that came with another database (another epoch). */
  _reset(epoch, previous) {
    this._stats.resets++;
    this._resetAll();
    const dropped = this._outbox.filter((e) => e.kind !== 'send');
    this._outbox = this._outbox.filter((e) => e.kind === 'send');
    for (const e of dropped) {
      this._done(e.clientId);
      this.emit('failed', {
        clientId: e.clientId,
        entry: e,
        error: new ChatError('epoch', 'the message it changes is gone (the database was replaced)'),
      });
    }
    this._saveOutbox();
    this.epoch = epoch;
    this._saveSync();
    this.emit('reset', { epoch, previous });
    this._emitInboxSoon();
  }

  _resetAll() {
    for (const c of this._convs.values()) {
      clearTimeout(c.gapTimer);
      clearTimeout(c.deliveredTimer);
      for (const t of c.typing.values()) clearTimeout(t);
    }
    this._convs = new Map();
    this._inbox = new Map();
  }

  /**
   * Takes a message from any source; returns whether it was new.
   * @param {any} m @param {string} source @param {string} [clientId]
   */
  _ingest(m, source, clientId) {
    if (!m || !parseConv(m.conv) || !Number.isInteger(m.seq) || m.seq < 1) return false;
    const c = this._conv(m.conv);
    const msg = copyMessage(m);
    const prev = c.messages.get(msg.seq);
    if (prev) {
      // Seen before (it still counts for the cursor). A later read (history, sync) may
      // carry a newer state of it.
      this._advance(c, msg.seq);
      if (!isEvent(prev) && source !== 'live') {
        if (msg.deleted && !prev.deleted) this._applyDelete(c, prev, null);
        else if (msg.edited && !prev.deleted && msg.body !== prev.body) this._applyEdit(c, prev, msg.body, null);
      }
      return false;
    }
    c.messages.set(msg.seq, msg);
    if (msg.seq > c.maxSeq) c.maxSeq = msg.seq;
    this._advance(c, msg.seq);
    if (isEvent(msg)) {
      const target = msg.edit != null ? msg.edit : msg.delete;
      const latest = c.changes.get(target);
      if (!latest || latest.seq < msg.seq) c.changes.set(target, msg);
      const t = c.messages.get(target);
      if (t && !isEvent(t)) {
        if (msg.delete != null) this._applyDelete(c, t, msg);
        else if (!t.deleted) this._applyEdit(c, t, msg.body, msg);
      }
    } else {
      // An edit or delete that arrived before the message it changes.
      const change = c.changes.get(msg.seq);
      if (change) {
        if (change.delete != null) {
          msg.deleted = true;
          delete msg.body;
        } else if (!msg.deleted && change.body !== undefined) {
          msg.body = change.body;
          msg.edited = true;
        }
      }
      this.emit('message', { message: msg, source, clientId });
      if (c.typing.has(msg.from)) this._typingOff(c, msg.from);
    }
    this._inboxOnMessage(msg, source);
    if (msg.from !== this.uid) {
      c.deliverDue = true;
      this._deliveredSoon(c);
    }
    return true;
  }

  _applyEdit(c, target, body, event) {
    if (body !== undefined) target.body = body;
    target.edited = true;
    this.emit('update', { message: target, by: event ? event.from : undefined });
    this._inboxOnChange(c.conv, target);
  }

  _applyDelete(c, target, event) {
    target.deleted = true;
    delete target.body;
    this.emit('update', { message: target, by: event ? event.from : undefined });
    this._inboxOnChange(c.conv, target);
  }

  /** Moves the cursor of `c` over `seq` if it is the next one; else remembers it. */
  _advance(c, seq) {
    const before = c.cursor;
    if (!c.cursor) {
      c.cursor = seq;
    } else if (seq === c.cursor + 1) {
      c.cursor = seq;
    } else if (seq > c.cursor + 1) {
      c.ahead.add(seq);
      this._gapSoon(c);
      return;
    } else {
      return;
    }
    while (c.ahead.delete(c.cursor + 1)) c.cursor++;
    for (const s of Array.from(c.ahead)) if (s <= c.cursor) c.ahead.delete(s);
    if (c.cursor !== before) this._saveSoon();
  }

  _gapSoon(c) {
    if (c.gapTimer || c.fill || this._syncing) return;
    c.gapTimer = setTimeout(() => {
      c.gapTimer = null;
      this._fillGap(c);
    }, this.options.gapDelay);
  }

  /** Asks `history` for the seqs between the cursor and the lowest seq seen above it. */
  _fillGap(c) {
    if (!this._welcomed || c.fill || this._syncing || !c.ahead.size) return;
    const low = Math.min(...c.ahead);
    const missing = low - c.cursor - 1;
    if (missing <= 0) {
      this._advance(c, low);
      return;
    }
    c.fill = true;
    this._stats.gaps++;
    this.emit('gap', { conv: c.conv, after: c.cursor, before: low });
    const cursor = c.cursor;
    // From the cursor up: the page right above it, so the cursor can move.
    const before = Math.min(low, cursor + 1 + MAX_HISTORY);
    this._history(c.conv, before, before - cursor - 1, true).then(
      () => {
        c.fill = false;
        if (c.cursor === cursor) {
          // Nothing came that fills it (not expected: seqs are gap-free). Give up on
          // this gap rather than ask forever; the next sync covers it.
          c.ahead.clear();
          return;
        }
        if (c.ahead.size) this._fillGap(c);
      },
      (e) => {
        c.fill = false;
        if (e && (e.code === 'not_member' || e.code === 'forbidden' || e.code === 'not_found')) c.ahead.clear();
      },
    );
  }

  // ------------------------------------------------------------------ sync

  _startSync() {
    if (!this._welcomed) return;
    if (this._syncing) {
      this._syncAgain = true;
      return;
    }
    this._syncing = true;
    this.emit('syncing', {});
    const gen = this._gen;
    let rounds = 0;
    let lastMore = '';
    const round = () => {
      rounds++;
      this._stats.syncs++;
      const cursors = {};
      for (const c of this._convs.values()) if (c.cursor > 0) cursors[c.conv] = c.cursor;
      const before = JSON.stringify(cursors);
      this._request({ type: 'sync', cursors }, (f) => (f.type === 'synced' ? DONE : NO), { internal: true }).then(
        (f) => {
          const more = Array.isArray(f.more) ? f.more.filter((x) => typeof x === 'string') : [];
          const now = {};
          for (const c of this._convs.values()) if (c.cursor > 0) now[c.conv] = c.cursor;
          const key = JSON.stringify(more);
          const progressed = JSON.stringify(now) !== before || key !== lastMore;
          lastMore = key;
          if (more.length && progressed && rounds < 10000) return round();
          this._syncing = false;
          if (this._syncAgain) {
            this._syncAgain = false;
            return this._startSync();
          }
          this.emit('synced', { rounds });
          for (const c of this._convs.values()) {
            if (c.ahead.size) this._fillGap(c);
            if (c.deliverDue) this._deliveredSoon(c);
          }
          return undefined;
        },
        () => {
          if (gen === this._gen) this._syncing = false;
        },
      );
    };
    round();
  }

  /** Asks for a sync now (as the server's `resync` does). */
  sync() {
    this._startSync();
  }

  /** Whether a sync is running. */
  get syncing() {
    return this._syncing;
  }

  // ------------------------------------------------------------------ history

  _history(conv, before, limit, internal) {
    const frame = { type: 'history', conv, limit: limit || this.options.historyLimit };
    if (before != null) frame.before = before;
    this._stats.histories++;
    return this._request(frame, (f) => (f.type === 'history' && f.conv === conv ? DONE : NO), {
      internal: !!internal,
    }).then((f) => {
      const msgs = Array.isArray(f.messages) ? f.messages : [];
      for (const m of msgs) {
        if (!m.conv) m.conv = conv;
        this._ingest(m, 'history');
      }
      return { conv, messages: msgs.filter((m) => !isEvent(m)), more: !!f.more };
    });
  }

  /**
   * Loads the newest page of `conv` (up to `limit`, default 50). Resolves with the
   * page; its messages are also `message` events if new.
   * @returns {Promise<{conv: string, messages: Message[], more: boolean}>}
   */
  async loadLatest(conv, limit) {
    const page = await this._history(conv, null, limit || this.options.historyLimit, false);
    const c = this._conv(conv);
    c.latestLoaded = true;
    if (c.hasOlder == null || page.messages.length) c.hasOlder = page.more;
    return page;
  }

  /**
   * Loads the page before the oldest message cached of `conv`.
   * @returns {Promise<{conv: string, messages: Message[], more: boolean}>}
   */
  async loadOlder(conv, limit) {
    const c = this._conv(conv);
    let oldest = Infinity;
    for (const s of c.messages.keys()) if (s < oldest) oldest = s;
    if (oldest === Infinity) return this.loadLatest(conv, limit);
    if (oldest <= 1) {
      c.hasOlder = false;
      return { conv, messages: [], more: false };
    }
    const page = await this._history(conv, oldest, limit || this.options.historyLimit, false);
    c.hasOlder = page.more;
    return page;
  }

  /** One `history` request, as the contract has it. */
  history(conv, opts) {
    const o = opts || {};
    return this._history(conv, o.before, o.limit, false);
  }

  /** Whether older messages than those cached are kept (null: not known yet). */
  hasOlder(conv) {
    const c = this._convs.get(conv);
    return c ? c.hasOlder : null;
  }

  /** Whether the newest page of `conv` was loaded on this client. */
  latestLoaded(conv) {
    const c = this._convs.get(conv);
    return !!(c && c.latestLoaded);
  }

  /** The cached messages of `conv` (not edit/delete events), oldest first. */
  messages(conv) {
    const c = this._convs.get(conv);
    if (!c) return [];
    return Array.from(c.messages.values())
      .filter((m) => !isEvent(m))
      .sort((a, b) => a.seq - b.seq);
  }

  /** One cached message. */
  message(conv, seq) {
    const c = this._convs.get(conv);
    const m = c && c.messages.get(seq);
    return m && !isEvent(m) ? m : null;
  }

  /** The contiguous cursor of `conv` (0: none yet). */
  cursor(conv) {
    const c = this._convs.get(conv);
    return c ? c.cursor : 0;
  }

  /** Every cursor (what the next `sync` sends). */
  cursors() {
    const out = {};
    for (const c of this._convs.values()) if (c.cursor > 0) out[c.conv] = c.cursor;
    return out;
  }

  /** Counters for tests and debugging: syncs, histories, gaps, resyncs, resets. */
  get stats() {
    return { ...this._stats };
  }

  // ------------------------------------------------------------------ sending

  _checkBody(body) {
    if (typeof body !== 'string' || !body.trim()) throw new ChatError('invalid', 'the message is empty');
    if (byteLength(body) > this.options.maxBodyBytes) {
      throw new ChatError('too_large', 'the message is longer than ' + this.options.maxBodyBytes + ' bytes');
    }
  }

  _enqueue(entry) {
    entry.tries = 0;
    let resolve;
    let reject;
    const sent = new Promise((res, rej) => {
      resolve = res;
      reject = rej;
    });
    sent.catch(() => {}); // a caller that does not wait must not see "unhandled"
    entry._resolve = resolve;
    entry._reject = reject;
    this._outbox.push(entry);
    this._saveOutbox();
    this.emit('pending', { entry });
    if (this._welcomed) this._sendEntry(entry);
    return { clientId: entry.clientId, entry, sent };
  }

  /**
   * Sends `body` to conversation `conv` (`dm:A:B` or `room:R`). The message waits in
   * the outbox (and in storage) until the server stores it; `sent` resolves with it.
   * Throws a ChatError (`invalid`, `too_large`, `not_ready`) at once for what the
   * server would refuse anyway.
   * @returns {{clientId: string, entry: OutboxEntry, sent: Promise<Message>}}
   */
  send(conv, body) {
    const p = parseConv(conv);
    if (!p) throw new ChatError('invalid', 'not a conversation id: ' + conv);
    if (p.kind === 'dm' && !this.uid) throw new ChatError('not_ready', 'the user is not known yet');
    if (p.kind === 'dm' && peerOf(conv, this.uid) == null) throw new ChatError('invalid', conv + ' is not yours');
    this._checkBody(body);
    return this._enqueue({ clientId: newClientId(), kind: 'send', conv, body, created: Date.now() });
  }

  /** Sends a DM to `to` (see `send`). */
  sendDirect(to, body) {
    if (!this.uid) throw new ChatError('not_ready', 'the user is not known yet');
    if (!validId(to) || to === this.uid) throw new ChatError('invalid', 'not a valid person: ' + to);
    return this.send(dmConv(this.uid, to), body);
  }

  /** Sends to room `room` (see `send`). */
  sendRoom(room, body) {
    if (!validId(room)) throw new ChatError('invalid', 'not a valid room: ' + room);
    return this.send(roomConv(room), body);
  }

  /** Replaces the body of your message `seq` of `conv` (through the outbox, like a send). */
  edit(conv, seq, body) {
    if (!parseConv(conv) || !Number.isInteger(seq)) throw new ChatError('invalid', 'edit needs conv and seq');
    this._checkBody(body);
    return this._enqueue({ clientId: newClientId(), kind: 'edit', conv, body, target: seq, created: Date.now() });
  }

  /** Deletes message `seq` of `conv` (yours, or any in a room you own). */
  delete(conv, seq) {
    if (!parseConv(conv) || !Number.isInteger(seq)) throw new ChatError('invalid', 'delete needs conv and seq');
    return this._enqueue({ clientId: newClientId(), kind: 'delete', conv, target: seq, created: Date.now() });
  }

  /** The unconfirmed sends of `conv` (or of all conversations), oldest first. */
  pending(conv) {
    return this._outbox.filter((e) => conv == null || e.conv === conv);
  }

  /** Drops an unconfirmed entry from the outbox (the user gave up on it). */
  discard(clientId) {
    const i = this._outbox.findIndex((e) => e.clientId === clientId);
    if (i < 0) return false;
    const [entry] = this._outbox.splice(i, 1);
    this._done(clientId);
    this._saveOutbox();
    if (entry._reject) entry._reject(new ChatError('discarded', 'discarded'));
    return true;
  }

  _frameOf(e) {
    if (e.kind === 'edit') return { type: 'edit', conv: e.conv, seq: e.target, body: e.body, client_id: e.clientId };
    if (e.kind === 'delete') return { type: 'delete', conv: e.conv, seq: e.target, client_id: e.clientId };
    const p = parseConv(e.conv);
    if (p.kind === 'room') return { type: 'room', room: p.room, body: e.body, client_id: e.clientId };
    return { type: 'direct', to: peerOf(e.conv, this.uid), body: e.body, client_id: e.clientId };
  }

  _sendEntry(e) {
    if (!this._welcomed) return;
    if (e.kind === 'send' && parseConv(e.conv).kind === 'dm' && peerOf(e.conv, this.uid) == null) {
      this._failEntry(e, new ChatError('invalid', e.conv + ' is not a conversation of ' + this.uid));
      return;
    }
    e.tries++;
    e.inflight = true;
    e.retryAt = 0;
    const req = { frame: this._frameOf(e), kind: 'outbox', entry: e, timer: null, reject: () => {} };
    req.timer = setTimeout(() => {
      e.inflight = false;
      this._timedOut(req);
    }, this.options.requestTimeout);
    e._req = req;
    this._inflight.push(req);
    this._write(req.frame);
  }

  /** After a (re)connect every unconfirmed entry goes again (same client_id). */
  _flushOutbox(all) {
    if (!this._welcomed) return;
    const now = Date.now();
    let next = Infinity;
    for (const e of this._outbox.slice()) {
      if (all) e.inflight = false;
      if (e.inflight) continue;
      if (!all && e.retryAt && e.retryAt > now) {
        next = Math.min(next, e.retryAt);
        continue;
      }
      this._sendEntry(e);
    }
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
    if (next !== Infinity) {
      this._retryTimer = setTimeout(() => {
        this._retryTimer = null;
        this._flushOutbox(false);
      }, next - now);
    }
  }

  _takeEntry(clientId) {
    const i = this._outbox.findIndex((e) => e.clientId === clientId);
    if (i < 0) return null;
    const e = this._outbox[i];
    if (e._req) this._forget(e._req);
    e._req = null;
    e.inflight = false;
    return e;
  }

  _onSent(f) {
    if (typeof f.client_id !== 'string') return;
    const i = this._outbox.findIndex((e) => e.clientId === f.client_id);
    if (i < 0) return; // an answer to a resend already answered
    const idx = this._inflight.findIndex((r) => r.kind === 'outbox' && r.entry === this._outbox[i]);
    if (idx >= 0) this._resolveSilentBefore(idx);
    const e = this._takeEntry(f.client_id);
    this._outbox.splice(this._outbox.indexOf(e), 1);
    this._done(e.clientId);
    this._saveOutbox();
    const p = parseConv(e.conv);
    const m = {
      conv: f.conv || e.conv,
      seq: f.seq,
      id: f.id,
      from: this.uid,
      ts: f.ts,
    };
    if (p.kind === 'room') m.room = p.room;
    else m.to = peerOf(e.conv, this.uid);
    if (e.kind === 'edit') m.edit = e.target;
    if (e.kind === 'delete') m.delete = e.target;
    if (e.kind !== 'delete') m.body = e.body;
    this._ingest(m, 'sent', e.clientId);
    const c = this._conv(m.conv);
    // Sending marks it read by its sender (the server does the same).
    if (f.seq > c.readSent) c.readSent = f.seq;
    const stored = c.messages.get(f.seq) || m;
    this.emit('sent', { clientId: e.clientId, entry: e, message: stored });
    if (e._resolve) e._resolve(stored);
  }

  _failEntry(e, error) {
    const i = this._outbox.indexOf(e);
    if (i >= 0) this._outbox.splice(i, 1);
    this._done(e.clientId);
    this._saveOutbox();
    this.emit('failed', { clientId: e.clientId, entry: e, error });
    if (e._reject) e._reject(error);
  }

  _onError(f) {
    if (f.code === 'rate_limited' && f.client_id == null) {
      // Some frame was refused, and not in order: which one is not known. A new
      // connection starts clean (sync, outbox) without guessing.
      this.emit('error', { code: f.code, message: f.message });
      this.dropConnection(4002);
      return;
    }
    if (f.client_id == null) return; // matched to a request by _answer
    const e = this._takeEntry(f.client_id);
    if (!e) {
      this.emit('error', { code: f.code, message: f.message });
      return;
    }
    if (f.code === 'unavailable' || f.code === 'rate_limited') {
      // Not confirmed: the same client_id goes again later (stored at most once).
      const base = Math.min(30000, 1000 * Math.pow(2, Math.min(e.tries, 5)));
      e.retryAt = Date.now() + Math.round(base * (0.75 + this.random() * 0.5));
      this.emit('error', { code: f.code, message: f.message, clientId: e.clientId });
      this._flushOutbox(false);
      return;
    }
    this._failEntry(e, new ChatError(f.code, f.message));
  }

  // ------------------------------------------------------------------ marks

  /** The highest seq seen of `conv` (0: none). */
  lastSeq(conv) {
    const c = this._convs.get(conv);
    return c ? c.maxSeq : 0;
  }

  /**
   * Marks `conv` read up to `seq` (default: the newest message seen). Sent only when it
   * moves the mark forward. Updates the inbox's unread count.
   */
  markRead(conv, seq) {
    const c = this._conv(conv);
    const s = seq == null ? c.maxSeq : seq;
    if (!(s > 0)) return false;
    const item = this._inbox.get(conv);
    if (item) this._inboxRead(item, s);
    if (s <= c.readSent) return false;
    c.readSent = s;
    return this._silent({ type: 'read', conv, seq: s });
  }

  /** Marks `conv` delivered up to `seq` (done automatically with `autoDelivered`). */
  markDelivered(conv, seq) {
    const c = this._conv(conv);
    if (!(seq > c.deliveredSent)) return false;
    c.deliveredSent = seq;
    return this._silent({ type: 'delivered', conv, seq });
  }

  _deliveredSoon(c) {
    if (!this.options.autoDelivered || c.deliveredTimer || this._syncing) return;
    c.deliveredTimer = setTimeout(() => {
      c.deliveredTimer = null;
      if (!this._welcomed) return;
      // Only as far as this client has everything: a later device starts there.
      c.deliverDue = false;
      if (c.cursor > c.deliveredSent) this.markDelivered(c.conv, c.cursor);
    }, 300);
  }

  /**
   * Asks for every participant's marks of `conv`; afterwards `receiptsOf(conv)` has
   * them and `receipt` events keep them current.
   */
  async loadReceipts(conv) {
    const f = await this._request({ type: 'receipts', conv }, (x) =>
      x.type === 'receipts' && x.conv === conv ? DONE : NO,
    );
    const c = this._conv(conv);
    for (const kind of ['read', 'delivered']) {
      const map = f[kind] && typeof f[kind] === 'object' ? f[kind] : {};
      for (const uid of Object.keys(map)) {
        if (typeof map[uid] === 'number' && !(c.receipts[kind][uid] >= map[uid])) c.receipts[kind][uid] = map[uid];
      }
    }
    c.receiptsLoaded = true;
    this.emit('receipts', { conv });
    return this.receiptsOf(conv);
  }

  /** The marks known of `conv`: `{read: {uid: seq}, delivered: {uid: seq}}`. */
  receiptsOf(conv) {
    const c = this._convs.get(conv);
    if (!c) return { read: {}, delivered: {} };
    return { read: { ...c.receipts.read }, delivered: { ...c.receipts.delivered } };
  }

  /** Who else (not this user) has read `conv` up to at least `seq`. */
  seenBy(conv, seq) {
    const c = this._convs.get(conv);
    if (!c) return [];
    return Object.keys(c.receipts.read).filter((u) => u !== this.uid && c.receipts.read[u] >= seq);
  }

  /** Who else has `seq` of `conv` delivered (or read). */
  deliveredTo(conv, seq) {
    const c = this._convs.get(conv);
    if (!c) return [];
    const set = new Set();
    for (const kind of ['read', 'delivered']) {
      for (const u of Object.keys(c.receipts[kind])) if (u !== this.uid && c.receipts[kind][u] >= seq) set.add(u);
    }
    return Array.from(set);
  }

  _onMark(f) {
    if (typeof f.conv !== 'string' || typeof f.uid !== 'string' || typeof f.seq !== 'number') return;
    const kind = f.type;
    const c = this._conv(f.conv);
    if (!(c.receipts[kind][f.uid] >= f.seq)) c.receipts[kind][f.uid] = f.seq;
    // Read implies delivered (the server raises both).
    if (kind === 'read' && !(c.receipts.delivered[f.uid] >= f.seq)) c.receipts.delivered[f.uid] = f.seq;
    if (f.uid === this.uid) {
      // This user's other device.
      if (kind === 'read') {
        if (f.seq > c.readSent) c.readSent = f.seq;
        const item = this._inbox.get(f.conv);
        if (item) this._inboxRead(item, f.seq);
      } else if (f.seq > c.deliveredSent) c.deliveredSent = f.seq;
    }
    this.emit('receipt', { kind, conv: f.conv, uid: f.uid, seq: f.seq });
  }

  // ------------------------------------------------------------------ typing

  /**
   * Tells the others in `conv` that this user is typing: call it on every keystroke;
   * it sends at most once per `typingEvery` ms.
   */
  typing(conv) {
    const c = this._conv(conv);
    const now = Date.now();
    if (now - c.typingSent < this.options.typingEvery) return false;
    if (!this._silent({ type: 'typing', conv })) return false;
    c.typingSent = now;
    return true;
  }

  /** Who is typing in `conv` now. */
  typingIn(conv) {
    const c = this._convs.get(conv);
    return c ? Array.from(c.typing.keys()) : [];
  }

  _onTyping(f) {
    if (typeof f.conv !== 'string' || typeof f.uid !== 'string' || f.uid === this.uid) return;
    const c = this._conv(f.conv);
    const had = c.typing.has(f.uid);
    clearTimeout(c.typing.get(f.uid));
    c.typing.set(
      f.uid,
      setTimeout(() => this._typingOff(c, f.uid), this.options.typingTimeout),
    );
    if (!had) this.emit('typing', { conv: f.conv, uid: f.uid, active: true });
  }

  _typingOff(c, uid) {
    if (!c.typing.has(uid)) return;
    clearTimeout(c.typing.get(uid));
    c.typing.delete(uid);
    this.emit('typing', { conv: c.conv, uid, active: false });
  }

  // ------------------------------------------------------------------ inbox

  /**
   * Loads the inbox (the newest `limit` conversations) and keeps it current from then
   * on (`inbox` events, `conversations()`), also across reconnects.
   */
  async loadInbox(limit) {
    this._inboxWanted = true;
    this._inboxLimit = limit || 50;
    const f = await this._request({ type: 'inbox', limit: this._inboxLimit }, (x) =>
      x.type === 'inbox' ? DONE : NO,
    );
    this._takeInbox(f);
    return this.conversations();
  }

  _refreshInbox() {
    this._request({ type: 'inbox', limit: this._inboxLimit || 50 }, (x) => (x.type === 'inbox' ? DONE : NO), {
      internal: true,
    }).then(
      (f) => this._takeInbox(f),
      () => {},
    );
  }

  _refreshInboxSoon() {
    if (!this._inboxWanted || this._inboxTimer) return;
    this._inboxTimer = setTimeout(() => {
      this._inboxTimer = null;
      if (this._welcomed) this._refreshInbox();
    }, 300);
  }

  _takeInbox(f) {
    const list = Array.isArray(f.conversations) ? f.conversations : [];
    const next = new Map();
    for (const x of list) {
      const p = parseConv(x.conv);
      if (!p) continue;
      const item = {
        conv: x.conv,
        read: typeof x.read === 'number' ? x.read : 0,
        unread: typeof x.unread === 'number' ? x.unread : 0,
        last: x.last && typeof x.last === 'object' ? copyMessage({ ...x.last, conv: x.conv }) : null,
      };
      if (p.kind === 'room') item.room = p.room;
      else item.with = this.uid ? peerOf(x.conv, this.uid) : x.with;
      // What arrived here after the server answered is not in its numbers.
      const c = this._convs.get(x.conv);
      if (c) {
        const lastSeq = item.last ? item.last.seq : 0;
        for (const m of c.messages.values()) {
          if (m.seq <= lastSeq) continue;
          if (!item.last || m.seq > item.last.seq) item.last = m;
          if (!isEvent(m) && m.from !== this.uid && !m.deleted && m.seq > item.read) item.unread++;
        }
        if (c.readSent > item.read) this._inboxRead(item, c.readSent);
      }
      next.set(x.conv, item);
    }
    // Conversations this client knows of beyond the page asked for (or newer than it).
    for (const [conv, item] of this._inbox) {
      const p = parseConv(conv);
      if (!next.has(conv) && (p.kind === 'dm' || this.rooms.has(p.room))) next.set(conv, item);
    }
    for (const r of this.rooms) {
      const conv = roomConv(r);
      if (!next.has(conv)) next.set(conv, { conv, room: r, last: null, read: 0, unread: 0 });
    }
    this._inbox = next;
    this._emitInboxSoon();
  }

  _inboxEnsure(conv) {
    let item = this._inbox.get(conv);
    if (!item) {
      const p = parseConv(conv);
      if (!p) return null;
      item = { conv, last: null, read: 0, unread: 0 };
      if (p.kind === 'room') item.room = p.room;
      else item.with = peerOf(conv, this.uid);
      this._inbox.set(conv, item);
      this._emitInboxSoon();
    }
    return item;
  }

  _inboxOnMessage(m, source) {
    const p = parseConv(m.conv);
    if (p.kind === 'room' && !this.rooms.has(p.room) && !this._inbox.has(m.conv)) return;
    const item = this._inboxEnsure(m.conv);
    if (!item) return;
    if (item.last && m.seq <= item.last.seq) return;
    item.last = m;
    if (!isEvent(m) && m.from !== this.uid && m.seq > item.read && source !== 'history') item.unread++;
    if (m.from === this.uid && m.seq > item.read) {
      item.read = m.seq;
      item.unread = 0;
    }
    this._emitInboxSoon();
  }

  _inboxOnChange(conv, target) {
    const item = this._inbox.get(conv);
    if (!item) return;
    if (target.deleted && target.from !== this.uid && target.seq > item.read && item.unread > 0) item.unread--;
    this._emitInboxSoon();
  }

  _inboxRead(item, seq) {
    if (seq <= item.read && item.unread === 0) return;
    if (seq > item.read) item.read = seq;
    if (!item.last || item.read >= item.last.seq) {
      item.unread = 0;
    } else {
      const c = this._convs.get(item.conv);
      // Count from the cache when it has every seq above the mark; else ask.
      let complete = !!c;
      let n = 0;
      if (c) {
        for (let s = item.read + 1; s <= item.last.seq; s++) {
          const m = c.messages.get(s);
          if (!m) {
            complete = false;
            break;
          }
          if (!isEvent(m) && m.from !== this.uid && !m.deleted) n++;
        }
      }
      if (complete) item.unread = n;
      else this._refreshInboxSoon();
    }
    this._emitInboxSoon();
  }

  _emitInboxSoon() {
    if (this._inboxEmitSoon) return;
    this._inboxEmitSoon = true;
    Promise.resolve().then(() => {
      this._inboxEmitSoon = false;
      this.emit('inbox', { conversations: this.conversations() });
    });
  }

  /** The inbox: conversations with the newest message first, those without last.
   * @returns {InboxItem[]} */
  conversations() {
    const items = Array.from(this._inbox.values()).map((i) => ({
      conv: i.conv,
      with: i.with,
      room: i.room,
      last: i.last,
      read: i.read,
      unread: i.unread,
    }));
    items.sort((a, b) => {
      const ta = a.last ? a.last.ts : -1;
      const tb = b.last ? b.last.ts : -1;
      if (ta !== tb) return tb - ta;
      return a.conv < b.conv ? -1 : a.conv > b.conv ? 1 : 0;
    });
    return items;
  }

  /** One conversation of the inbox (or null). */
  conversation(conv) {
    const i = this._inbox.get(conv);
    return i ? this.conversations().find((x) => x.conv === conv) : null;
  }

  // ------------------------------------------------------------------ presence

  /**
   * Asks whether `uids` are online, and (with `subscribe`, the default) keeps this
   * connection told of every change, across reconnects. Resolves with `{uid: online}`.
   */
  async watchPresence(uids, subscribe) {
    const sub = subscribe !== false;
    const want = Array.from(new Set((uids || []).filter((u) => validId(u) && u !== this.uid)));
    const ask = sub ? want.filter((u) => !this._subscribed.has(u)) : want;
    if (sub) for (const u of ask) this._subscribed.add(u);
    const out = {};
    for (let i = 0; i < ask.length; i += MAX_PRESENCE) {
      await this._presence(ask.slice(i, i + MAX_PRESENCE), sub, false);
    }
    for (const u of want) out[u] = this._online.get(u);
    return out;
  }

  _presence(uids, subscribe, internal) {
    const frame = { type: 'presence', uids };
    if (subscribe) frame.subscribe = true;
    return this._request(
      frame,
      (f, req) => {
        if (f.type !== 'presence' || f.room != null) return NO;
        if (!req.left) req.left = uids.slice();
        const i = req.left.indexOf(f.uid);
        if (i < 0) return NO;
        req.left.splice(i, 1);
        return req.left.length ? MORE : DONE;
      },
      { internal },
    ).catch((e) => {
      if (e && e.code === 'limit') return null;
      if (internal) return null;
      throw e;
    });
  }

  _resubscribe() {
    const uids = Array.from(this._subscribed).slice(-MAX_PRESENCE);
    if (uids.length) this._presence(uids, true, true);
  }

  /** Whether `uid` is online (undefined: not known, e.g. while disconnected). */
  online(uid) {
    return this._online.get(uid);
  }

  /** Members of `room` known to be online (from room presence events). */
  onlineIn(room) {
    return Array.from(this._roomOnline.get(room) || []);
  }

  _onPresence(f) {
    if (typeof f.uid !== 'string') return;
    const online = !!f.online;
    if (f.room != null) {
      let set = this._roomOnline.get(f.room);
      if (!set) this._roomOnline.set(f.room, (set = new Set()));
      if (online) set.add(f.uid);
      else set.delete(f.uid);
      if (this._subscribed.has(f.uid)) this._online.set(f.uid, online);
      this.emit('presence', { uid: f.uid, online, room: f.room });
      return;
    }
    this._online.set(f.uid, online);
    this.emit('presence', { uid: f.uid, online });
  }

  // ------------------------------------------------------------------ rooms

  /** Joins a public room (creates it if it does not exist and creation is open).
   * Refusals reject with a ChatError: `forbidden` (private: an owner must add you;
   * banned), `not_found`, `limit`. */
  join(room) {
    return this._request({ type: 'join', room }, (f) =>
      f.type === 'joined' && f.room === room && !f.by ? DONE : NO,
    );
  }

  /** Leaves a room. */
  leave(room) {
    return this._request({ type: 'leave', room }, (f) => (f.type === 'left' && f.room === room && !f.by ? DONE : NO));
  }

  /** Creates a room with this user as its owner (`conflict` if it exists). */
  create(room, opts) {
    const priv = !!(opts && opts.private);
    return this._request(
      { type: 'create', room, private: priv },
      (f) => (f.type === 'joined' && f.room === room && !f.by ? DONE : NO),
      { retry: false },
    );
  }

  /** Adds `uid` to `room` (owners only), as `member` or `owner`. */
  add(room, uid, opts) {
    const frame = { type: 'add', room, uid };
    if (opts && opts.role) frame.role = opts.role;
    return this._request(frame, (f) => (f.type === 'added' && f.room === room && f.uid === uid ? DONE : NO), {
      retry: false,
    });
  }

  /** Removes `uid` from `room` (owners only); `ban` keeps them out until added again. */
  remove(room, uid, opts) {
    const ban = !!(opts && opts.ban);
    return this._request(
      { type: 'remove', room, uid, ban },
      (f) => (f.type === 'removed' && f.room === room && f.uid === uid ? DONE : NO),
      { retry: false },
    );
  }

  /** `{room, private, owners, members, count}` of a room you belong to. */
  roomInfo(room) {
    return this._request({ type: 'room_info', room }, (f) => (f.type === 'room_info' && f.room === room ? DONE : NO));
  }

  _onJoined(f) {
    if (typeof f.room !== 'string') return;
    const isNew = !this.rooms.has(f.room);
    this.rooms.add(f.room);
    this._inboxEnsure(roomConv(f.room));
    if (isNew || f.by) {
      this.emit('room', { room: f.room, joined: true, by: f.by, role: f.role, private: f.private });
      // Added by an owner: the room may have messages already.
      if (f.by) this._refreshInboxSoon();
    }
  }

  _onLeft(f) {
    if (typeof f.room !== 'string') return;
    const was = this.rooms.delete(f.room);
    const conv = roomConv(f.room);
    if (this._inbox.delete(conv)) this._emitInboxSoon();
    const c = this._convs.get(conv);
    if (c) {
      c.ahead.clear();
      for (const uid of Array.from(c.typing.keys())) this._typingOff(c, uid);
    }
    if (was || f.by) this.emit('room', { room: f.room, joined: false, by: f.by });
  }
}

function sessionUrlOf(wsUrl) {
  try {
    const u = new URL(wsUrl);
    u.protocol = u.protocol === 'wss:' ? 'https:' : 'http:';
    u.pathname = u.pathname.replace(/\/ws\/?$/, '') + '/session';
    u.search = '';
    return u.toString();
  } catch (e) {
    return '/session';
  }
}
