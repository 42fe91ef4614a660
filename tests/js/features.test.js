// Inbox, marks, typing, edits and deletes, presence, rooms: two library clients.
import { test, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { libClient, connected, until, withTimeout, SHARED_URL, wsUrl, cleanup } from './helpers.js';

afterEach(cleanup);

const url = wsUrl(SHARED_URL);

test('inbox, read and delivered marks, receipts', async () => {
  const a = libClient(url, 'in-a').client;
  const b = libClient(url, 'in-b').client;
  await connected(a);
  await connected(b);
  await b.loadInbox();
  const c = 'dm:in-a:in-b';
  await withTimeout(a.send(c, 'one').sent, 'one');
  await withTimeout(a.send(c, 'two').sent, 'two');
  await until('b has an unread conversation', () => b.conversation(c)?.unread === 2);
  const item = b.conversations()[0];
  assert.equal(item.conv, c);
  assert.equal(item.with, 'in-a');
  assert.equal(item.last.body, 'two');
  // b's client marks what arrived delivered by itself; a hears of it.
  await until('delivered to b', () => a.deliveredTo(c, 2).includes('in-b'));
  assert.deepEqual(a.seenBy(c, 2), []);
  b.markRead(c);
  await until('b read it (on a)', () => a.seenBy(c, 2).includes('in-b'));
  assert.equal(b.conversation(c).unread, 0);
  // What the server has, for a client that comes later.
  const fresh = libClient(url, 'in-a').client;
  await connected(fresh);
  const r = await fresh.loadReceipts(c);
  assert.equal(r.read['in-b'], 2);
  const inbox = await fresh.loadInbox();
  assert.equal(inbox.find((i) => i.conv === c).last.body, 'two');
  for (const x of [a, b, fresh]) x.close();
});

test('typing is sent at most every few seconds and forgotten after a while', async () => {
  const a = libClient(url, 'ty-a', { typingEvery: 1100 }).client;
  const b = libClient(url, 'ty-b', { typingTimeout: 600 }).client;
  await connected(a);
  await connected(b);
  const c = 'dm:ty-a:ty-b';
  const seen = [];
  b.on('typing', (e) => seen.push(e));
  assert.equal(a.typing(c), true);
  assert.equal(a.typing(c), false, 'not again within typingEvery');
  await until('b sees a typing', () => b.typingIn(c).includes('ty-a'));
  await until('and forgets it', () => b.typingIn(c).length === 0, 3000);
  assert.deepEqual(seen.map((e) => e.active), [true, false]);
  // Typing on (the page calls typing() on every key): sent again once typingEvery has
  // passed (the server passes one a second). A message from the typist ends it at once.
  await until('typing again', () => {
    a.typing(c);
    return b.typingIn(c).includes('ty-a');
  });
  await withTimeout(a.send(c, 'done typing').sent, 'send');
  await until('typing ended by the message', () => b.typingIn(c).length === 0, 500);
  a.close();
  b.close();
});

test('edits and deletes reach the other side and history', async () => {
  const a = libClient(url, 'ed-a').client;
  const b = libClient(url, 'ed-b').client;
  await connected(a);
  await connected(b);
  const c = 'dm:ed-a:ed-b';
  const m = await withTimeout(a.send(c, 'tpyo').sent, 'send');
  const gone = await withTimeout(a.send(c, 'oops').sent, 'send');
  await until('b has both', () => b.messages(c).length === 2);
  const updates = [];
  b.on('update', (e) => updates.push(e.message));
  await withTimeout(a.edit(c, m.seq, 'typo').sent, 'edit');
  await withTimeout(a.delete(c, gone.seq).sent, 'delete');
  await until('b applied both', () => updates.length === 2);
  assert.deepEqual(
    b.messages(c).map((x) => [x.body, !!x.edited, !!x.deleted]),
    [
      ['typo', true, false],
      [undefined, false, true],
    ],
  );
  // b cannot edit a's message.
  const refused = await b.edit(c, m.seq, 'mine now').sent.then(() => null, (e) => e);
  assert.equal(refused.code, 'forbidden');
  // A new client reads the latest state from history.
  const later = libClient(url, 'ed-b').client;
  await connected(later);
  const page = await later.loadLatest(c);
  assert.deepEqual(page.messages.map((x) => x.body ?? null), ['typo', null]);
  for (const x of [a, b, later]) x.close();
});

test('presence subscriptions flip when the other side comes and goes', async () => {
  const a = libClient(url, 'pr-a').client;
  await connected(a);
  const now = await a.watchPresence(['pr-b']);
  assert.deepEqual(now, { 'pr-b': false });
  const b = libClient(url, 'pr-b').client;
  await connected(b);
  await until('online', () => a.online('pr-b') === true);
  b.close();
  await until('offline', () => a.online('pr-b') === false);
  a.close();
});

test('rooms: create private, add, refused join with the reason, remove and ban', async () => {
  const owner = libClient(url, 'rm-owner').client;
  const guest = libClient(url, 'rm-guest').client;
  await connected(owner);
  await connected(guest);
  const joined = await owner.create('rm-team', { private: true });
  assert.equal(joined.role, 'owner');
  assert.equal(joined.private, true);
  assert.equal((await owner.create('rm-team').catch((e) => e)).code, 'conflict');
  const refused = await guest.join('rm-team').catch((e) => e);
  assert.equal(refused.code, 'forbidden');
  assert.match(refused.message, /private: an owner must add you/);

  const roomEvents = [];
  guest.on('room', (e) => roomEvents.push(e));
  await guest.loadInbox();
  await owner.add('rm-team', 'rm-guest');
  await until('the guest was added', () => guest.rooms.has('rm-team'));
  assert.equal(roomEvents[0].by, 'rm-owner');
  await until('in the inbox', () => guest.conversation('room:rm-team'));
  const info = await guest.roomInfo('rm-team');
  assert.deepEqual(info.owners, ['rm-owner']);
  assert.equal(info.count, 2);
  await withTimeout(guest.sendRoom('rm-team', 'hi all').sent, 'room send');

  await owner.remove('rm-team', 'rm-guest', { ban: true });
  await until('the guest left', () => !guest.rooms.has('rm-team'));
  assert.deepEqual(roomEvents.at(-1), { room: 'rm-team', joined: false, by: 'rm-owner' });
  assert.equal(guest.conversation('room:rm-team'), null);
  const banned = await guest.join('rm-team').catch((e) => e);
  assert.equal(banned.code, 'forbidden');
  assert.match(banned.message, /banned/);

  // A public room: joined and left by the user.
  const pub = await guest.join('rm-public');
  assert.equal(pub.role, 'owner', 'created by the join');
  assert.ok(guest.rooms.has('rm-public'));
  await guest.leave('rm-public');
  assert.ok(!guest.rooms.has('rm-public'));
  assert.deepEqual(roomEvents.at(-1), { room: 'rm-public', joined: false, by: undefined });
  assert.equal((await guest.roomInfo('rm-public').catch((e) => e)).code, 'not_member');
  owner.close();
  guest.close();
});
