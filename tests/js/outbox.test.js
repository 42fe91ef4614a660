// The outbox: unconfirmed sends survive a restart of the client (a page reload: a new
// library instance on the same storage) and go again with the same client_id, so the
// server stores each once.
import { test, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { libClient, connected, rawClient, until, MemoryStorage, SHARED_URL, wsUrl, withTimeout, cleanup } from './helpers.js';

afterEach(cleanup);

test('unconfirmed sends are resent after a reload, with the same client_id, and stored once', async () => {
  const url = wsUrl(SHARED_URL);
  const storage = new MemoryStorage();
  const c = 'dm:ob-a:ob-b';
  const b = await rawClient(url, 'ob-b');

  const first = libClient(url, 'ob-a', { storage });
  await connected(first.client);
  // One send never leaves (the page closed first); one is stored but its `sent` is lost.
  first.wire.dropOut = (f) => f.type === 'direct' && f.body === 'never left';
  first.wire.dropIn = (f) => f.type === 'sent' && first.wire.out.some((o) => o.client_id === f.client_id && o.body === 'answer lost');
  const lost = first.client.send(c, 'never left');
  const unanswered = first.client.send(c, 'answer lost');
  const confirmed = first.client.send(c, 'confirmed');
  const stored = await withTimeout(confirmed.sent, 'the confirmed send');
  assert.equal(stored.body, 'confirmed');
  // b got the two that reached the server.
  const got = [await b.next('message'), await b.next('message')].map((m) => m.body).sort();
  assert.deepEqual(got, ['answer lost', 'confirmed']);
  const kept = JSON.parse(storage.getItem('chatmesh:ob-a:outbox'));
  assert.deepEqual(
    kept.map((e) => [e.clientId, e.body]),
    [
      [lost.clientId, 'never left'],
      [unanswered.clientId, 'answer lost'],
    ],
    'the storage holds exactly the unconfirmed ones',
  );
  first.client.close();

  // The reload: a new instance on the same storage.
  const again = libClient(url, 'ob-a', { storage });
  assert.deepEqual(
    again.client.pending(c).map((e) => e.clientId),
    [lost.clientId, unanswered.clientId],
    'restored before connecting',
  );
  const sentIds = [];
  again.client.on('sent', (e) => sentIds.push(e.clientId));
  await connected(again.client);
  await until('both confirmed', () => sentIds.length === 2);
  assert.deepEqual(sentIds.sort(), [lost.clientId, unanswered.clientId].sort());
  const resent = again.wire.out.filter((f) => f.type === 'direct');
  assert.deepEqual(resent.map((f) => f.client_id).sort(), [lost.clientId, unanswered.clientId].sort());
  assert.equal(storage.getItem('chatmesh:ob-a:outbox'), null, 'nothing left to send');
  assert.deepEqual(again.client.pending(c), []);

  // Stored once each: the answer-lost one got its old seq back, and b sees three.
  const third = await b.next('message');
  assert.equal(third.body, 'never left');
  const history = await b.request({ type: 'history', conv: c }, 'history');
  assert.deepEqual(
    history.messages.map((m) => m.body),
    ['answer lost', 'confirmed', 'never left'],
  );
  const unansweredSeq = history.messages.find((m) => m.body === 'answer lost').seq;
  assert.equal(again.client.message(c, unansweredSeq).body, 'answer lost');
  assert.deepEqual(
    again.client.messages(c).map((m) => m.body),
    ['answer lost', 'never left'],
    'the resends are known to the new instance by their seq (the confirmed one came before it)',
  );
  again.client.close();
  b.close();
});

test('a send refused for good leaves the outbox and says why', async () => {
  const url = wsUrl(SHARED_URL);
  const storage = new MemoryStorage();
  const { client } = libClient(url, 'ob2-a', { storage });
  await connected(client);
  const s = client.sendRoom('ob2-not-joined', 'hello?');
  const err = await withTimeout(s.sent.then(() => null, (e) => e), 'the refusal');
  assert.equal(err.code, 'not_member');
  assert.deepEqual(client.pending(), []);
  assert.equal(storage.getItem('chatmesh:ob2-a:outbox'), null);
  assert.throws(() => client.send('dm:ob2-a:ob2-b', ''), { code: 'invalid' });
  assert.throws(() => client.send('dm:ob2-a:ob2-b', 'x'.repeat(5000)), { code: 'too_large' });
  client.close();
});
