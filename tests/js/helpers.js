// Helpers of the Node tests of static/chatmesh.js (run by tests/client_js.rs).
//
// Nodes are real chatmesh processes started by the Rust test; a test asks for its own
// through the control API in $CHATMESH_CONTROL. WebSockets are the `ws` package's, with
// a thin subclass that records every frame (and can lose chosen ones, to force the
// situations the library must survive: a message that never arrived, an answer lost
// with a closing page).
import WebSocket from 'ws';
import { ChatClient, MemoryStorage } from '../../static/chatmesh.js';

export { ChatClient, MemoryStorage };

const CONTROL = process.env.CHATMESH_CONTROL;
export const SHARED_URL = process.env.CHATMESH_URL;
if (!CONTROL || !SHARED_URL) {
  throw new Error('run these through `cargo test --test client_js` (it sets CHATMESH_URL and CHATMESH_CONTROL)');
}

/** How long one expected thing may take. */
export const WAIT = 15000;

// Everything a test opened, closed after it (also when it failed): `afterEach(cleanup)`.
const opened = [];

/** Closes every client, socket and node the last test opened. */
export async function cleanup() {
  while (opened.length) {
    const close = opened.pop();
    try {
      await close();
    } catch (e) {
      /* already closed */
    }
  }
}

async function control(path, body) {
  const r = await fetch(CONTROL + path, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(body || {}),
  });
  const v = await r.json();
  if (r.status !== 200) throw new Error('control ' + path + ': ' + JSON.stringify(v));
  return v;
}

/** A node process of its own: `{id, url, ws, stop(), kill(), start()}`. */
export async function startNode(store, args) {
  const n = await control('/nodes', { store: store || 'memory', args: args || [] });
  const node = {
    id: n.id,
    url: n.url,
    ws: wsUrl(n.url),
    stop: () => control('/nodes/' + n.id + '/stop'),
    kill: () => control('/nodes/' + n.id + '/kill'),
    start: async () => {
      const s = await control('/nodes/' + n.id + '/start');
      if (s.url !== node.url) throw new Error('restarted on another address: ' + s.url);
      return s;
    },
  };
  opened.push(() => node.kill());
  return node;
}

export function wsUrl(base) {
  return base.replace(/^http/, 'ws') + '/ws';
}

/** Polls `cond` until it returns something truthy; fails after `timeout` with `what`. */
export async function until(what, cond, timeout) {
  const deadline = Date.now() + (timeout || WAIT);
  let last;
  for (;;) {
    try {
      last = await cond();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) throw new Error('timed out waiting for ' + what + ' (last: ' + String(last) + ')');
    await new Promise((r) => setTimeout(r, 20));
  }
}

/**
 * A WebSocket class for the library that records frames in `wire`:
 * `wire.out` (frames sent, parsed), `wire.in` (frames received), `wire.sockets`,
 * `wire.opened` (timestamps of connection attempts), `wire.closes` ({code, at}).
 * `wire.dropIn(f)` / `wire.dropOut(f)`: frames for which it returns true are lost.
 */
export function recordingWebSocket() {
  const wire = {
    out: [],
    in: [],
    sockets: [],
    opened: [],
    closes: [],
    dropIn: () => false,
    dropOut: () => false,
  };
  class Recording extends WebSocket {
    constructor(url) {
      super(url);
      wire.sockets.push(this);
      wire.opened.push(Date.now());
    }
    send(text) {
      const f = JSON.parse(text);
      if (wire.dropOut(f)) return;
      wire.out.push({ ...f, at: Date.now() });
      super.send(text);
    }
    set onmessage(fn) {
      super.onmessage = (ev) => {
        const f = JSON.parse(String(ev.data));
        if (wire.dropIn(f)) return;
        wire.in.push({ ...f, at: Date.now() });
        fn({ data: String(ev.data) });
      };
    }
    get onmessage() {
      return super.onmessage;
    }
    set onclose(fn) {
      super.onclose = (ev) => {
        wire.closes.push({ code: ev.code, at: Date.now() });
        fn(ev);
      };
    }
    get onclose() {
      return super.onclose;
    }
  }
  return { WebSocket: Recording, wire };
}

/** A library client (fast backoff for tests) and its recorded wire. */
export function libClient(url, uid, extra) {
  const { WebSocket: Ws, wire } = recordingWebSocket();
  const client = new ChatClient({
    url,
    uid,
    WebSocket: Ws,
    storage: new MemoryStorage(),
    backoff: { min: 200, max: 1000 },
    ...(extra || {}),
  });
  const events = [];
  client.on('*', (e) => events.push(e));
  opened.push(() => client.close());
  return { client, wire, events };
}

/** Connects and waits for the first sync to finish. */
export async function connected(client) {
  const synced = new Promise((r) => client.once('synced', r));
  client.connect();
  await withTimeout(synced, 'the first sync of ' + (client.uid || 'a client'));
  return client;
}

export async function withTimeout(promise, what, ms) {
  let timer;
  const t = new Promise((_, rej) => {
    timer = setTimeout(() => rej(new Error('timed out: ' + what)), ms || WAIT);
  });
  try {
    return await Promise.race([promise, t]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * A plain protocol client (no library): the other side of a conversation.
 * `send(frame)`, `next(type)` (skipping others), `request(frame, type)`, `close()`.
 */
export async function rawClient(url, uid) {
  const ws = new WebSocket(url + '?uid=' + encodeURIComponent(uid));
  opened.push(() => ws.terminate());
  const queue = [];
  const waiters = [];
  ws.on('message', (d) => {
    const f = JSON.parse(String(d));
    queue.push(f);
    while (waiters.length) waiters.shift()();
  });
  await new Promise((res, rej) => {
    ws.once('open', res);
    ws.once('error', rej);
  });
  const c = {
    ws,
    frames: queue,
    send(frame) {
      ws.send(JSON.stringify(frame));
    },
    async next(type) {
      const deadline = Date.now() + WAIT;
      for (;;) {
        const i = queue.findIndex((f) => f.type === type);
        if (i >= 0) return queue.splice(i, 1)[0];
        const left = deadline - Date.now();
        if (left <= 0) throw new Error(uid + ': no ' + type + ' frame');
        await new Promise((r) => {
          const t = setTimeout(r, left);
          waiters.push(() => {
            clearTimeout(t);
            r();
          });
        });
      }
    },
    async request(frame, type) {
      c.send(frame);
      return c.next(type);
    },
    async direct(to, body, clientId) {
      const sent = await c.request({ type: 'direct', to, body, client_id: clientId }, 'sent');
      if (sent.client_id !== clientId) throw new Error('sent for another client_id: ' + JSON.stringify(sent));
      return sent;
    },
    close() {
      ws.close();
    },
  };
  c.welcome = await c.next('welcome');
  return c;
}
