// Connecting again: backoff, 1012, a new database (epoch), refused credentials.
import { test, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { startNode, libClient, connected, rawClient, until, withTimeout, ChatClient, MemoryStorage, cleanup } from './helpers.js';

afterEach(cleanup);

const conv = (a, b) => (a < b ? `dm:${a}:${b}` : `dm:${b}:${a}`);

test('1012 reconnects at once; a dead node is retried with growing, jittered delays', async () => {
  const node = await startNode('sqlite');
  const { client, wire, events } = libClient(node.ws, 'rc-a', { backoff: { min: 400, max: 3200 } });
  await connected(client);
  const epoch = client.epoch;
  const b = await rawClient(node.ws, 'rc-b');
  await b.direct('rc-a', 'before', 'rc-k1');
  const c = conv('rc-a', 'rc-b');
  await until('before', () => client.cursor(c) === 1);

  // SIGTERM: the node closes every websocket with 1012 and exits.
  const stopped = await node.stop();
  assert.equal(stopped.code, 0);
  await until('the close', () => wire.closes.length >= 1);
  assert.equal(wire.closes[0].code, 1012);
  // The first attempt follows the close at once (no backoff: scheduled with delay 0;
  // how soon it then runs depends on the machine's load, so it is not timed) ...
  await until('a reconnect attempt', () => wire.opened.length >= 2);
  const first = events.find((e) => e.type === 'status' && e.detail.state === 'reconnecting');
  assert.equal(first.detail.code, 1012, JSON.stringify(first.detail));
  assert.equal(first.detail.delay, 0, 'the first attempt after 1012 waits for no backoff');
  // ... and, the node being gone, the next ones back off: delays from 200..400 ms
  // doubling, with jitter.
  await until('three more attempts', () => wire.opened.length >= 5, 20000);
  const delays = events
    .filter((e) => e.type === 'status' && e.detail.state === 'reconnecting' && e.detail.delay > 0)
    .map((e) => e.detail.delay);
  assert.ok(delays.length >= 3, JSON.stringify(delays));
  assert.ok(delays[0] >= 200 && delays[0] <= 400, 'first backoff ' + delays[0]);
  assert.ok(delays[1] >= 400 && delays[1] <= 800, 'second backoff ' + delays[1]);
  assert.ok(delays[2] >= 800 && delays[2] <= 1600, 'third backoff ' + delays[2]);
  const gaps = wire.opened.slice(2).map((t, i) => t - wire.opened[i + 1]);
  assert.ok(gaps[0] >= 190, 'attempts are spaced: ' + JSON.stringify(gaps));

  // Back on the same port and database: same epoch, nothing reset, delivery resumes.
  await node.start();
  await until('connected again', () => client.state === 'open', 20000);
  assert.equal(client.epoch, epoch);
  assert.equal(events.filter((e) => e.type === 'reset').length, 0);
  const b2 = await rawClient(node.ws, 'rc-b');
  await b2.direct('rc-a', 'after', 'rc-k2');
  await until('after', () => client.cursor(c) === 2);
  assert.deepEqual(client.messages(c).map((m) => m.body), ['before', 'after']);
  assert.equal(wire.out.filter((f) => f.type === 'sync').at(-1).cursors[c], 1, 'synced from its cursor');
  client.close();
  b.close();
  b2.close();
  await node.kill();
});

test('a new database (epoch) drops cursors and cached messages and syncs from scratch', async () => {
  const node = await startNode('memory');
  const storage = new MemoryStorage();
  const { client, wire, events } = libClient(node.ws, 'ep-a', { storage });
  await connected(client);
  const first = client.epoch;
  const b = await rawClient(node.ws, 'ep-b');
  const c = conv('ep-a', 'ep-b');
  for (let i = 1; i <= 3; i++) await b.direct('ep-a', 'old ' + i, 'ep-k' + i);
  await until('three messages', () => client.cursor(c) === 3);
  b.close();

  // Restarted on memory: an empty database with a new epoch; seqs start at 1 again.
  await node.start();
  await until('the reset', () => events.some((e) => e.type === 'reset'), 20000);
  const reset = events.find((e) => e.type === 'reset').detail;
  assert.equal(reset.previous, first);
  assert.notEqual(reset.epoch, first);
  await until('connected again', () => client.state === 'open' && !client.syncing);
  const syncs = wire.out.filter((f) => f.type === 'sync');
  assert.deepEqual(syncs.at(-1).cursors, {}, 'the sync after the new epoch has no cursor');
  assert.deepEqual(client.messages(c), [], 'the old messages are gone');
  assert.equal(client.cursor(c), 0);

  const b2 = await rawClient(node.ws, 'ep-b');
  const sent = await b2.direct('ep-a', 'new 1', 'ep-new-1');
  assert.equal(sent.seq, 1);
  await until('the new seq 1', () => client.cursor(c) === 1);
  assert.deepEqual(client.messages(c).map((m) => m.body), ['new 1']);
  // What is stored is of the new epoch.
  await until('the cursor stored', () => JSON.parse(storage.getItem('chatmesh:ep-a:sync')).cursors[c] === 1);
  assert.equal(JSON.parse(storage.getItem('chatmesh:ep-a:sync')).epoch, reset.epoch);

  // A later page load on the same storage: the new epoch, its cursor, no reset.
  client.close();
  const later = libClient(node.ws, 'ep-a', { storage });
  await connected(later.client);
  assert.equal(later.events.filter((e) => e.type === 'reset').length, 0);
  assert.deepEqual(later.wire.out.find((f) => f.type === 'sync').cursors, { [c]: 1 });
  later.client.close();
  b2.close();
  await node.kill();
});

test('stored cursors of another epoch are dropped at the first welcome', async () => {
  const node = await startNode('memory');
  const storage = new MemoryStorage();
  storage.setItem('chatmesh:ep2-a:sync', JSON.stringify({ epoch: 'an-old-database', cursors: { 'dm:ep2-a:ep2-b': 40 } }));
  const { client, wire, events } = libClient(node.ws, 'ep2-a', { storage });
  assert.equal(client.cursor('dm:ep2-a:ep2-b'), 40);
  await connected(client);
  assert.ok(events.some((e) => e.type === 'reset' && e.detail.previous === 'an-old-database'));
  assert.deepEqual(wire.out.find((f) => f.type === 'sync').cursors, {});
  const b = await rawClient(node.ws, 'ep2-b');
  await b.direct('ep2-a', 'hello', 'ep2-k1');
  await until('seq 1 shown', () => client.messages('dm:ep2-a:ep2-b').length === 1);
  client.close();
  b.close();
  await node.kill();
});

test('a refused token is reported with the server reason, and not retried', async () => {
  const node = await startNode('memory', ['--jwt-secret', 'a-test-secret']);
  const client = new ChatClient({
    url: node.ws,
    token: 'not-a-jwt',
    storage: new MemoryStorage(),
    WebSocket: (await import('ws')).default,
    backoff: { min: 100, max: 200 },
  });
  const refused = new Promise((r) => client.once('unauthorized', r));
  client.connect();
  const why = await withTimeout(refused, 'unauthorized');
  assert.match(why.message, /invalid token/);
  assert.equal(client.state, 'unauthorized');
  client.close();
  await node.kill();
});
