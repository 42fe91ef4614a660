// Sync, gaps and resync: the library ends with every message, each once, and a
// cursor that only moves over contiguous seqs.
import { test, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { startNode, libClient, connected, rawClient, until, SHARED_URL, wsUrl, MemoryStorage, cleanup } from './helpers.js';

afterEach(cleanup);

const conv = (a, b) => (a < b ? `dm:${a}:${b}` : `dm:${b}:${a}`);
const bodies = (client, c) => client.messages(c).map((m) => m.body);

test('live messages arrive once, in order, and move the cursor', async () => {
  const url = wsUrl(SHARED_URL);
  const { client } = libClient(url, 'live-a');
  await connected(client);
  const b = await rawClient(url, 'live-b');
  const seen = [];
  client.on('message', ({ message }) => seen.push(message.seq));
  for (let i = 1; i <= 5; i++) await b.direct('live-a', 'm' + i, 'live-k' + i);
  // A resend of the same client_id is the same message: nothing new arrives.
  await b.direct('live-a', 'm5', 'live-k5');
  const c = conv('live-a', 'live-b');
  await until('five messages', () => client.cursor(c) === 5);
  assert.deepEqual(bodies(client, c), ['m1', 'm2', 'm3', 'm4', 'm5']);
  assert.deepEqual(seen, [1, 2, 3, 4, 5]);
  // The same messages again (history overlaps what came live; a sync from an older
  // cursor repeats them): nothing is shown twice.
  await client.loadLatest(c);
  const synced = new Promise((r) => client.once('synced', r));
  client._conv(c).cursor = 2;
  client.sync();
  await synced;
  assert.equal(client.cursor(c), 5);
  assert.deepEqual(seen, [1, 2, 3, 4, 5]);
  client.close();
  b.close();
});

test('a seq that jumps is filled with history before the cursor moves on', async () => {
  const url = wsUrl(SHARED_URL);
  const { client, wire, events } = libClient(url, 'gap-a');
  await connected(client);
  // The live copy of m2 never arrives (as when a peer delivery was lost).
  wire.dropIn = (f) => f.type === 'message' && f.body === 'm2';
  const b = await rawClient(url, 'gap-b');
  const c = conv('gap-a', 'gap-b');
  await b.direct('gap-a', 'm1', 'gap-k1');
  await until('m1', () => client.cursor(c) === 1);
  await b.direct('gap-a', 'm2', 'gap-k2');
  await b.direct('gap-a', 'm3', 'gap-k3');
  await until('the cursor over the gap', () => client.cursor(c) === 3);
  assert.deepEqual(bodies(client, c), ['m1', 'm2', 'm3']);
  const asked = wire.out.filter((f) => f.type === 'history' && f.conv === c);
  assert.equal(asked.length, 1, 'one history request: ' + JSON.stringify(asked));
  assert.equal(asked[0].before, 3);
  assert.equal(asked[0].limit, 1);
  assert.ok(events.some((e) => e.type === 'gap' && e.detail.conv === c && e.detail.after === 1));
  assert.equal(wire.in.filter((f) => f.type === 'message' && f.body === 'm2').length, 0, 'm2 came only by history');
  client.close();
  b.close();
});

test('sync pages on while synced.more lists the conversation', async () => {
  // Its own node: the other side sends faster than the default rate limit.
  const node = await startNode('memory', ['--rate-per-sec', '100000', '--rate-burst', '100000']);
  const url = node.ws;
  const storage = new MemoryStorage();
  const first = libClient(url, 'more-a', { storage });
  await connected(first.client);
  const b = await rawClient(url, 'more-b');
  const c = conv('more-a', 'more-b');
  await b.direct('more-a', 'first', 'more-k0');
  await until('the first message', () => first.client.cursor(c) === 1);
  first.client.close();
  // 250 messages while more-a is away: more than two sync pages (100 each).
  for (let i = 1; i <= 250; i++) await b.direct('more-a', 'n' + i, 'more-k' + i);
  const again = libClient(url, 'more-a', { storage });
  await connected(again.client);
  await until('all 251', () => again.client.cursor(c) === 251);
  const syncs = again.wire.out.filter((f) => f.type === 'sync');
  assert.deepEqual(
    syncs.map((f) => f.cursors[c]),
    [1, 101, 201],
    'one sync per page, each from the new cursor',
  );
  const synced = again.wire.in.filter((f) => f.type === 'synced');
  assert.deepEqual(synced.map((f) => f.more), [[c], [c], []]);
  // Everything above the cursor kept from the first visit, once, in order.
  assert.deepEqual(bodies(again.client, c), Array.from({ length: 250 }, (_, i) => 'n' + (i + 1)));
  again.client.close();
  b.close();
});

test('resync from the server is answered with sync, which brings what was dropped', async () => {
  // A small outbound queue and large bodies: a client that stops reading for a moment
  // overflows it, the node drops live messages and sends resync once it caught up.
  const node = await startNode('memory', [
    '--outbound-queue', '16',
    '--max-body-bytes', '60000',
    '--rate-per-sec', '100000',
    '--rate-burst', '100000',
    '--client-timeout-ms', '120000',
  ]);
  const { client, wire, events } = libClient(node.ws, 'rs-a', { maxBodyBytes: 60000 });
  await connected(client);
  const b = await rawClient(node.ws, 'rs-b');
  const c = conv('rs-a', 'rs-b');
  const total = 250;
  const big = 'x'.repeat(59000);
  const socket = wire.sockets.at(-1);
  socket.pause(); // reads nothing while the burst is stored and pushed
  for (let i = 1; i <= total; i++) b.send({ type: 'direct', to: 'rs-a', body: big + i, client_id: 'rs-k' + i });
  for (let i = 1; i <= total; i++) await b.next('sent');
  socket.resume();
  await until('every message', () => client.cursor(c) === total, 60000);
  const resync = wire.in.findIndex((f) => f.type === 'resync');
  assert.ok(resync >= 0, 'the node sent resync');
  const live = wire.in.filter((f) => f.type === 'message').length;
  assert.ok(client.stats.resyncs >= 1);
  const syncAfter = wire.out.filter((f) => f.type === 'sync' && f.at >= wire.in[resync].at);
  assert.ok(syncAfter.length >= 1, 'a sync followed the resync');
  assert.equal(client.messages(c).length, total);
  assert.equal(new Set(client.messages(c).map((m) => m.seq)).size, total);
  // The tail was dropped (nothing came live after it), so only the sync could bring it.
  const liveBodies = new Set(wire.in.filter((f) => f.type === 'message' && f.at < wire.in[resync].at).map((f) => f.seq));
  assert.ok(!liveBodies.has(total), 'the last message was not delivered live before resync (' + live + ' live frames)');
  assert.equal(events.filter((e) => e.type === 'gap').length, 0, 'no gap was seen: the dropped ones were the newest');
  client.close();
  b.close();
  await node.kill();
});
