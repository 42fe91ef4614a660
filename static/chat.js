// chatmesh pages: the glue between the DOM and the client library (chatmesh.js).
//
// Two pages load this module:
//   - the start page (form#start-form): checks the form, keeps a token in this tab's
//     sessionStorage (JWT mode) instead of the URL;
//   - the messenger (main#chat): inbox on the left, the open conversation on the right.
//
// Everything the protocol asks (reconnects, sync, gaps, the outbox, marks, typing,
// presence, rooms) is in chatmesh.js; this file only draws. Message text is only ever
// put into the page with textContent.
import { ChatClient, ChatError, dmConv, roomConv, parseConv, peerOf, validId } from './chatmesh.js';

const TOKEN_KEY = 'chatmesh:token';
const DEBUG_KEY = 'chatmesh:debug';

const startForm = document.getElementById('start-form');
if (startForm) startPage(startForm);
const messengerRoot = document.getElementById('chat');
if (messengerRoot) messenger(messengerRoot);

// ------------------------------------------------------------------ helpers

function $(id) {
  return document.getElementById(id);
}

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text != null) e.textContent = text;
  return e;
}

function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
}

/** A stable colour per id, for avatars. */
function hue(id) {
  let h = 0;
  for (let i = 0; i < id.length; i++) h = (h * 31 + id.charCodeAt(i)) >>> 0;
  return h % 360;
}

function paintAvatar(node, name, isRoom) {
  node.textContent = isRoom ? '#' : (name || '?').slice(0, 1).toUpperCase();
  node.style.setProperty('--avatar-hue', String(hue(name || '?')));
  node.classList.toggle('room-avatar', !!isRoom);
}

function sameDay(a, b) {
  return a.getFullYear() === b.getFullYear() && a.getMonth() === b.getMonth() && a.getDate() === b.getDate();
}

function timeOf(ts) {
  return new Date(ts).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
}

/** Short time for the inbox: today's time, else weekday (this week) or date. */
function shortWhen(ts) {
  if (!ts) return '';
  const d = new Date(ts);
  const now = new Date();
  if (sameDay(d, now)) return timeOf(ts);
  const days = (now - d) / 86400000;
  if (days < 6) return d.toLocaleDateString([], { weekday: 'short' });
  return d.toLocaleDateString([], { day: 'numeric', month: 'short' });
}

function dayLabel(ts) {
  const d = new Date(ts);
  const now = new Date();
  if (sameDay(d, now)) return 'Today';
  const y = new Date(now);
  y.setDate(now.getDate() - 1);
  if (sameDay(d, y)) return 'Yesterday';
  const opts = { weekday: 'long', day: 'numeric', month: 'long' };
  if (d.getFullYear() !== now.getFullYear()) opts.year = 'numeric';
  return d.toLocaleDateString([], opts);
}

function capitalise(s) {
  return s ? s.charAt(0).toUpperCase() + s.slice(1) : s;
}

// ------------------------------------------------------------------ start page

function startPage(form) {
  const jwt = form.dataset.mode === 'jwt';
  const err = $('start-error');
  const to = $('start-to');
  const room = $('start-room');
  const create = $('start-create');
  const who = jwt ? $('start-token') : $('start-uid');
  const inputs = Array.from(form.querySelectorAll('input'));

  // Red only after the user touched a field (not on an empty page).
  for (const input of inputs) {
    input.addEventListener('blur', () => {
      if (input.value) input.classList.add('touched');
    });
    input.addEventListener('input', () => {
      if (input.classList.contains('touched') || input.validity.valid) return;
      if (input.value.length > 1) input.classList.add('touched');
    });
  }
  if (jwt) {
    const kept = sessionStorage.getItem(TOKEN_KEY);
    if (kept && !who.value) who.value = kept;
  }

  function fail(text, field) {
    err.textContent = text;
    err.hidden = !text;
    if (field) {
      field.classList.add('touched');
      field.focus();
    }
  }

  form.addEventListener('submit', (ev) => {
    let kind = ev.submitter && ev.submitter.dataset ? ev.submitter.dataset.kind : '';
    if (!kind) kind = to.value && !room.value ? 'to' : room.value && !to.value ? 'room' : 'inbox';
    const id = who.value.trim();
    if (!id) {
      ev.preventDefault();
      return fail(jwt ? 'Paste your access token first.' : 'Choose your id first.', who);
    }
    if (!jwt && !validId(id)) {
      ev.preventDefault();
      return fail('Your id may only use letters, digits and _ . - (at most 64).', who);
    }
    const inRoom = kind === 'room' || kind === 'create';
    const used = kind === 'to' ? to : inRoom ? room : null;
    if (used && !used.value) {
      ev.preventDefault();
      return fail(kind === 'to' ? 'Whom do you want to talk to?' : kind === 'create' ? 'Name the new room.' : 'Which room?', used);
    }
    if (used && !validId(used.value)) {
      ev.preventDefault();
      return fail('Ids may only use letters, digits and _ . - (at most 64).', used);
    }
    if (!jwt && kind === 'to' && used.value === id) {
      ev.preventDefault();
      return fail('Choose someone other than yourself.', used);
    }
    fail('');
    if (jwt) {
      // The token goes to this tab's storage, not into URLs and history.
      ev.preventDefault();
      sessionStorage.setItem(TOKEN_KEY, id);
      const q = new URLSearchParams();
      if (kind === 'to') q.set('to', used.value);
      if (inRoom) q.set('room', used.value);
      if (kind === 'create') q.set('create', 'private');
      location.assign((kind === 'inbox' ? '/inbox' : '/chat') + (q.toString() ? '?' + q : ''));
      return;
    }
    // A disabled field is not submitted: the query has at most one of to / room.
    to.disabled = kind !== 'to';
    room.disabled = !inRoom;
    create.disabled = kind !== 'create';
  });

  // Back from the chat (bfcache): every field usable again.
  window.addEventListener('pageshow', () => {
    to.disabled = false;
    room.disabled = false;
    create.disabled = true;
  });
}

// ------------------------------------------------------------------ messenger

async function messenger(root) {
  const dev = root.dataset.mode === 'dev';
  const ui = {
    conn: $('conn-status'),
    meName: $('me-name'),
    meAvatar: $('me-avatar'),
    debugToggle: $('debug-toggle'),
    debugInfo: $('debug-info'),
    newChat: $('new-chat'),
    newChatInput: $('new-chat-input'),
    newRoomToggle: $('new-room-toggle'),
    newRoomForm: $('new-room-form'),
    newRoomName: $('new-room-name'),
    newRoomPrivate: $('new-room-private'),
    newRoomError: $('new-room-error'),
    inbox: $('inbox'),
    inboxEmpty: $('inbox-empty'),
    placeholder: $('conv-placeholder'),
    head: root.querySelector('.conv-head'),
    main: root.querySelector('.conv-main'),
    back: $('back'),
    convAvatar: $('conv-avatar'),
    title: $('chat-title'),
    presence: $('presence'),
    roomMeta: $('room-meta'),
    membersToggle: $('members-toggle'),
    banner: $('banner'),
    bannerText: $('banner-text'),
    bannerRetry: $('banner-retry'),
    toasts: $('toasts'),
    scroller: $('scroller'),
    older: $('load-older'),
    list: $('messages'),
    empty: $('conv-empty'),
    refusal: $('refusal'),
    refusalTitle: $('refusal-title'),
    refusalReason: $('refusal-reason'),
    refusalAction: $('refusal-action'),
    typing: $('typing'),
    editBar: $('edit-bar'),
    editCancel: $('edit-cancel'),
    form: $('send-form'),
    input: $('send-input'),
    sendButton: $('send-button'),
    panel: $('room-panel'),
    memberCount: $('member-count'),
    addMember: $('add-member'),
    addMemberInput: $('add-member-input'),
    memberError: $('member-error'),
    memberList: $('member-list'),
    membersClose: $('members-close'),
    leaveRoom: $('leave-room'),
    authError: $('auth-error'),
    authReason: $('auth-reason'),
  };

  // ---------------------------------------------------------------- identity

  let uid = root.dataset.uid || '';
  let token = null;
  if (!dev) {
    const q = new URLSearchParams(location.search);
    if (q.get('token')) {
      token = q.get('token');
      sessionStorage.setItem(TOKEN_KEY, token);
      q.delete('token');
      q.delete('uid');
      history.replaceState(history.state, '', location.pathname + (q.toString() ? '?' + q : ''));
    } else {
      token = sessionStorage.getItem(TOKEN_KEY);
    }
    if (!token) return showAuthError('This server signs users in with a token, and this tab has none.');
    // A refused websocket upgrade says nothing to a page: ask the server why first.
    try {
      const r = await fetch('/session?token=' + encodeURIComponent(token), { cache: 'no-store' });
      const body = await r.json().catch(() => ({}));
      if (r.status === 401) return showAuthError(body.message || 'The token was refused.');
      if (r.ok && typeof body.uid === 'string') uid = body.uid;
    } catch (e) {
      /* the node is not reachable now: the client keeps trying */
    }
  }

  function showAuthError(reason) {
    root.dataset.auth = 'refused';
    ui.authReason.textContent = capitalise(reason);
    ui.authError.hidden = false;
    setConn('unauthorized', 'Not signed in');
    sessionStorage.removeItem(TOKEN_KEY);
  }

  const wsUrl = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/ws';
  const client = new ChatClient(
    dev ? { url: wsUrl, uid, sessionUrl: '/session' } : { url: wsUrl, token, sessionUrl: '/session' },
  );

  // ---------------------------------------------------------------- page state

  /** The open conversation: {conv, kind, peer?, room?} or null. */
  let current = null;
  /** seq -> element of the open conversation; clientId -> pending element. */
  let shown = new Map();
  let pendingShown = new Map();
  let historyLoaded = false;
  let historyInFlight = false;
  let roomInfo = null;
  let editing = null;
  let stuckToBottom = true;
  let debug = localStorage.getItem(DEBUG_KEY) === '1';
  const wantedTo = root.dataset.to || '';
  const wantedRoom = root.dataset.room || '';
  // The start page's "Create private room": create it (once) instead of joining it.
  let createWanted = wantedRoom && root.dataset.create ? { room: wantedRoom, private: root.dataset.create === 'private' } : null;

  function setMe() {
    ui.meName.textContent = uid || '…';
    paintAvatar(ui.meAvatar, uid || '?', false);
  }
  setMe();

  function setDebug(on) {
    debug = on;
    document.body.classList.toggle('debug', on);
    ui.debugToggle.setAttribute('aria-pressed', String(on));
    ui.debugInfo.hidden = !on;
    ui.debugInfo.textContent = on
      ? 'node ' + (client.node || document.body.dataset.node || '?') + ' · epoch ' + (client.epoch || '?').slice(0, 8)
      : '';
  }
  ui.debugToggle.addEventListener('click', () => {
    localStorage.setItem(DEBUG_KEY, debug ? '0' : '1');
    setDebug(!debug);
  });
  setDebug(debug);

  // ---------------------------------------------------------------- connection

  let bannerTimer = null;
  let countdown = null;

  function setConn(state, text) {
    root.dataset.conn = state;
    ui.conn.dataset.state = state;
    ui.conn.textContent = text;
  }

  function showBanner(text, retry) {
    ui.bannerText.textContent = text;
    ui.bannerRetry.hidden = !retry;
    ui.banner.hidden = false;
  }

  client.on('status', (s) => {
    clearInterval(countdown);
    clearTimeout(bannerTimer);
    if (s.state === 'open') {
      setConn('online', 'Online');
      ui.banner.hidden = true;
    } else if (s.state === 'connecting') {
      setConn('connecting', 'Connecting…');
    } else if (s.state === 'reconnecting') {
      const at = Date.now() + (s.delay || 0);
      const tick = () => {
        const secs = Math.ceil((at - Date.now()) / 1000);
        const text = secs > 0 ? 'Reconnecting in ' + secs + ' s…' : 'Reconnecting…';
        setConn('reconnecting', text);
        if (!ui.banner.hidden || secs > 1) showBanner('Connection lost. ' + text, secs > 1);
      };
      tick();
      countdown = setInterval(tick, 1000);
      // A short blip (a node restarting) does not need a banner.
      bannerTimer = setTimeout(() => {
        if (client.state !== 'open') showBanner('Connection lost. Reconnecting…', true);
      }, 1500);
    } else if (s.state === 'unauthorized') {
      showAuthError(s.reason || 'The credentials were refused.');
    }
    renderPresence();
    renderComposerState();
  });
  ui.bannerRetry.addEventListener('click', () => client.reconnectNow());
  window.addEventListener('online', () => client.reconnectNow());

  client.on('unauthorized', ({ message }) => showAuthError(message));

  client.on('welcome', (w) => {
    if (w.uid !== uid) {
      uid = w.uid;
      setMe();
    }
    setDebug(debug);
    if (!current && (wantedTo || wantedRoom) && firstOpen) {
      firstOpen = false;
      openConv(wantedRoom ? roomConv(wantedRoom) : dmConv(uid, wantedTo), { replace: true });
    } else if (current) {
      if (current.kind === 'room' && !current.ready && !current.refused) {
        enterRoom();
      } else if (current.ready) {
        // Marks and members may have changed while the connection was down.
        client.loadReceipts(current.conv).then(renderMarks, () => {});
        if (current.kind === 'room') refreshRoomInfo();
      }
    }
    firstOpen = false;
    if (!inboxAsked) {
      // Once: the library keeps it current across reconnects.
      inboxAsked = true;
      client.loadInbox(50).then(subscribeInboxPeers, () => {});
    }
  });
  let firstOpen = true;
  let inboxAsked = false;

  client.on('reset', () => {
    // A new database: everything shown came with the old one.
    if (current) {
      const conv = current.conv;
      current = null;
      openConv(conv, { keepUrl: true });
    }
    renderInbox(client.conversations());
  });

  // ---------------------------------------------------------------- inbox

  const typingByConv = new Map();

  function convLink(conv) {
    const p = parseConv(conv);
    const q = new URLSearchParams();
    if (dev) q.set('uid', uid);
    if (p.kind === 'room') q.set('room', p.room);
    else q.set('to', peerOf(conv, uid));
    return '/chat?' + q;
  }

  function previewOf(item) {
    const m = item.last;
    if (!m) return item.room ? 'No messages yet' : '';
    const who = m.from === uid ? 'You: ' : item.room ? m.from + ': ' : '';
    // A delete names an older message: say who deleted one (not "message deleted", as
    // if the conversation's newest message were gone).
    if (m.delete != null) return (m.from === uid ? 'You' : m.from) + ' deleted a message';
    if (m.deleted) return who + 'message deleted';
    if (m.edit != null) return who + (m.body != null ? m.body : 'message edited');
    return who + (m.body || '');
  }

  function renderInbox(items) {
    const keep = new Map();
    for (const li of Array.from(ui.inbox.children)) keep.set(li.dataset.conv, li);
    clear(ui.inbox);
    for (const item of items) {
      const li = keep.get(item.conv) || buildInboxItem(item.conv);
      fillInboxItem(li, item);
      ui.inbox.appendChild(li);
    }
    ui.inboxEmpty.hidden = items.length > 0;
  }

  function buildInboxItem(conv) {
    const li = el('li', 'conv-item');
    li.dataset.conv = conv;
    const a = el('a', 'conv-link');
    a.href = convLink(conv);
    a.addEventListener('click', (ev) => {
      if (ev.metaKey || ev.ctrlKey || ev.shiftKey || ev.button !== 0) return;
      ev.preventDefault();
      openConv(conv, {});
    });
    const avatar = el('span', 'avatar');
    const dot = el('span', 'dot');
    const wrap = el('span', 'avatar-wrap');
    wrap.append(avatar, dot);
    const text = el('span', 'conv-text');
    const top = el('span', 'conv-top');
    const name = el('span', 'conv-name');
    const when = el('time', 'conv-when');
    top.append(name, when);
    const bottom = el('span', 'conv-bottom');
    const preview = el('span', 'conv-preview');
    const badge = el('span', 'badge');
    bottom.append(preview, badge);
    text.append(top, bottom);
    a.append(wrap, text);
    li.appendChild(a);
    return li;
  }

  function fillInboxItem(li, item) {
    const isRoom = !!item.room;
    const name = isRoom ? item.room : item.with || peerOf(item.conv, uid) || '?';
    li.classList.toggle('active', !!current && current.conv === item.conv);
    li.classList.toggle('unread', item.unread > 0);
    li.dataset.unread = String(item.unread);
    const a = li.querySelector('.conv-link');
    a.href = convLink(item.conv);
    paintAvatar(li.querySelector('.avatar'), name, isRoom);
    li.querySelector('.conv-name').textContent = isRoom ? '#' + name : name;
    const when = li.querySelector('.conv-when');
    when.textContent = item.last ? shortWhen(item.last.ts) : '';
    if (item.last) when.dateTime = new Date(item.last.ts).toISOString();
    const typers = typingByConv.get(item.conv);
    const preview = li.querySelector('.conv-preview');
    preview.classList.toggle('is-typing', !!(typers && typers.size));
    preview.textContent = typers && typers.size ? (isRoom ? Array.from(typers)[0] + ' is typing…' : 'typing…') : previewOf(item);
    const badge = li.querySelector('.badge');
    badge.textContent = item.unread > 99 ? '99+' : String(item.unread);
    badge.hidden = !(item.unread > 0);
    const dot = li.querySelector('.dot');
    const online = isRoom ? undefined : client.online(name);
    dot.dataset.online = online === true ? 'true' : online === false ? 'false' : '';
    dot.hidden = isRoom;
  }

  client.on('inbox', ({ conversations }) => {
    renderInbox(conversations);
    if (inboxAsked) subscribeInboxPeers();
  });

  const watched = new Set();
  function subscribeInboxPeers() {
    const peers = client
      .conversations()
      .filter((i) => !i.room)
      .map((i) => i.with || peerOf(i.conv, uid))
      .filter(Boolean)
      .slice(0, 60);
    if (current && current.peer) peers.unshift(current.peer);
    // Asks only about those not yet watched (the library remembers).
    const fresh = peers.filter((p) => !watched.has(p));
    if (!fresh.length) return;
    for (const p of fresh) watched.add(p);
    client.watchPresence(fresh).then(() => renderInbox(client.conversations()), () => {});
  }

  // ---------------------------------------------------------------- new chats

  ui.newChat.addEventListener('submit', (ev) => {
    ev.preventDefault();
    let v = ui.newChatInput.value.trim();
    if (!v) return;
    const isRoom = v.startsWith('#');
    if (isRoom) v = v.slice(1);
    if (!validId(v)) return toast('Ids use letters, digits and _ . - only (1 to 64).', 'error');
    if (!isRoom && v === uid) return toast('That is you. Pick someone else.', 'error');
    if (!uid && !isRoom) return toast('Still connecting…', 'error');
    ui.newChatInput.value = '';
    openConv(isRoom ? roomConv(v) : dmConv(uid, v), {});
  });

  ui.newRoomToggle.addEventListener('click', () => {
    const open = ui.newRoomForm.hidden;
    ui.newRoomForm.hidden = !open;
    ui.newRoomToggle.setAttribute('aria-expanded', String(open));
    if (open) ui.newRoomName.focus();
  });
  $('new-room-cancel').addEventListener('click', () => {
    ui.newRoomForm.hidden = true;
    ui.newRoomToggle.setAttribute('aria-expanded', 'false');
  });
  ui.newRoomForm.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const name = ui.newRoomName.value.trim().replace(/^#/, '');
    const showErr = (t) => {
      ui.newRoomError.textContent = t;
      ui.newRoomError.hidden = !t;
    };
    if (!validId(name)) return showErr('Room names use letters, digits and _ . - only.');
    showErr('');
    try {
      await client.create(name, { private: ui.newRoomPrivate.checked });
      ui.newRoomName.value = '';
      ui.newRoomForm.hidden = true;
      ui.newRoomToggle.setAttribute('aria-expanded', 'false');
      openConv(roomConv(name), {});
      setTimeout(() => togglePanel(true), 0);
    } catch (e) {
      showErr(e.code === 'conflict' ? 'A room named ' + name + ' already exists.' : capitalise(e.message));
    }
  });

  // ---------------------------------------------------------------- opening a conversation

  function setUrl(conv, replace) {
    const url = convLink(conv);
    if (location.pathname + location.search === url) return;
    if (replace) history.replaceState({ conv }, '', url);
    else history.pushState({ conv }, '', url);
  }

  window.addEventListener('popstate', () => {
    const q = new URLSearchParams(location.search);
    const to = q.get('to');
    const room = q.get('room');
    if (room && validId(room)) openConv(roomConv(room), { keepUrl: true });
    else if (to && validId(to) && uid) openConv(dmConv(uid, to), { keepUrl: true });
    else closeConv();
  });

  function closeConv() {
    current = null;
    root.dataset.view = 'list';
    root.dataset.conv = '';
    ui.placeholder.hidden = false;
    ui.head.hidden = true;
    ui.main.hidden = true;
    document.title = 'Inbox · chatmesh';
    renderInbox(client.conversations());
  }

  ui.back.addEventListener('click', () => {
    const q = new URLSearchParams();
    if (dev) q.set('uid', uid);
    history.pushState({}, '', '/inbox' + (q.toString() ? '?' + q : ''));
    closeConv();
  });

  function openConv(conv, opts) {
    const p = parseConv(conv);
    if (!p) return;
    if (current && current.conv === conv && current.ready && !opts.force) {
      root.dataset.view = 'conv';
      return;
    }
    cancelEdit();
    current = { conv, kind: p.kind, ready: false, refused: false };
    if (p.kind === 'room') current.room = p.room;
    else current.peer = peerOf(conv, uid);
    shown = new Map();
    pendingShown = new Map();
    historyLoaded = false;
    historyInFlight = false;
    roomInfo = null;
    stuckToBottom = true;
    clear(ui.list);
    clear(ui.toasts);
    ui.empty.hidden = true;
    ui.refusal.hidden = true;
    ui.older.hidden = true;
    ui.typing.textContent = '';
    root.dataset.view = 'conv';
    root.dataset.conv = conv;
    delete root.dataset.loaded;
    ui.placeholder.hidden = true;
    ui.head.hidden = false;
    ui.main.hidden = false;
    const name = p.kind === 'room' ? p.room : current.peer;
    ui.title.textContent = p.kind === 'room' ? '#' + name : name;
    document.title = (p.kind === 'room' ? '#' + name : name) + ' · chatmesh';
    paintAvatar(ui.convAvatar, name, p.kind === 'room');
    ui.membersToggle.hidden = p.kind !== 'room';
    ui.roomMeta.hidden = p.kind !== 'room';
    ui.roomMeta.textContent = '';
    togglePanel(false);
    if (!opts.keepUrl) setUrl(conv, !!opts.replace);
    renderPresence();
    renderComposerState();
    renderInbox(client.conversations());
    if (p.kind === 'dm') {
      client.watchPresence([current.peer]).then(renderPresence, () => {});
      loadConv();
    } else if (client.state === 'open') {
      enterRoom();
    } // else: the welcome says whether we are a member (see 'welcome')
    ui.input.focus({ preventScroll: true });
  }

  /** Joins the open room if needed (showing why not), then loads it. */
  function enterRoom() {
    const c = current;
    if (!c || c.kind !== 'room') return;
    if (createWanted && createWanted.room === c.room) return createRoom(c);
    if (client.rooms.has(c.room)) return loadConv();
    client.join(c.room).then(
      () => {
        // (The `room` event of the join may have loaded it already.)
        if (current === c && !c.ready) loadConv();
      },
      (e) => {
        if (current !== c) return;
        if (e.code === 'disconnected') return; // the welcome tries again
        c.refused = true;
        showRefusal('You cannot join #' + c.room, refusalText(e, c.room));
      },
    );
  }

  /** Creates the open room with this user as its owner (asked for in the URL). */
  function createRoom(c) {
    client.create(c.room, { private: createWanted.private }).then(
      () => {
        createWanted = null;
        // A reload opens the room; it does not try to create it again.
        if (current === c) setUrl(c.conv, true);
        if (current === c && !c.ready) loadConv();
        if (current === c) togglePanel(true);
      },
      (e) => {
        if (e.code === 'disconnected') return; // the welcome tries again
        createWanted = null;
        if (current !== c) return;
        setUrl(c.conv, true);
        if (e.code === 'conflict') {
          toast('A room named ' + c.room + ' already exists.', 'error');
          enterRoom();
        } else {
          c.refused = true;
          showRefusal('You cannot create #' + c.room, refusalText(e, c.room));
        }
      },
    );
  }

  function refusalText(e, room) {
    if (e.code === 'forbidden' && /banned/.test(e.message)) return 'You are banned from #' + room + '. An owner can add you again.';
    if (e.code === 'forbidden' && /private/.test(e.message)) return '#' + room + ' is private: an owner must add you.';
    if (e.code === 'not_found') return 'There is no room #' + room + '.';
    if (e.code === 'limit') return 'You are in as many rooms as you may be. Leave one first.';
    return capitalise(e.message || e.code);
  }

  /** Says why the open room cannot be read; `action` is an offer: {label, run}. */
  function showRefusal(title, reason, action) {
    ui.refusalTitle.textContent = title;
    ui.refusalReason.textContent = reason;
    ui.refusalAction.hidden = !action;
    ui.refusalAction.textContent = action ? action.label : '';
    ui.refusalAction.onclick = action ? action.run : null;
    ui.refusal.hidden = false;
    ui.empty.hidden = true;
    ui.older.hidden = true;
    // Not a member: there is no member list to show.
    ui.membersToggle.hidden = true;
    togglePanel(false);
    renderComposerState();
  }

  function loadConv() {
    const c = current;
    c.ready = true;
    c.refused = false;
    ui.refusal.hidden = true;
    ui.membersToggle.hidden = c.kind !== 'room';
    renderComposerState();
    for (const m of client.messages(c.conv)) showMessage(m);
    for (const e of client.pending(c.conv)) showPending(e);
    historyInFlight = true;
    client.loadLatest(c.conv).then(
      () => {
        if (current !== c) return;
        historyInFlight = false;
        historyLoaded = true;
        root.dataset.loaded = 'true';
        updateOlder();
        updateEmpty();
        scrollToBottom();
        markReadIfSeen();
      },
      (e) => {
        if (current !== c) return;
        historyInFlight = false;
        if (e.code === 'not_member') {
          c.ready = false;
          showRefusal('You are not in #' + c.room, 'Join the room to read it.');
        } else toast(capitalise(e.message), 'error');
      },
    );
    client.loadReceipts(c.conv).then(renderMarks, () => {});
    if (c.kind === 'room') refreshRoomInfo();
    renderTyping();
  }

  // ---------------------------------------------------------------- messages

  function nearBottom() {
    const s = ui.scroller;
    return s.scrollHeight - s.scrollTop - s.clientHeight < 60;
  }

  function scrollToBottom() {
    ui.scroller.scrollTop = ui.scroller.scrollHeight;
    stuckToBottom = true;
  }

  ui.scroller.addEventListener('scroll', () => {
    stuckToBottom = nearBottom();
    if (stuckToBottom) markReadIfSeen();
  });
  // The newest message stays in view when anything changes size (a notice, the
  // keyboard on a phone, a longer input box).
  new ResizeObserver(() => {
    if (stuckToBottom) ui.scroller.scrollTop = ui.scroller.scrollHeight;
  }).observe(ui.scroller);

  function updateEmpty() {
    ui.empty.hidden = !(historyLoaded && shown.size === 0 && pendingShown.size === 0 && ui.refusal.hidden);
  }

  function updateOlder() {
    const more = current && client.hasOlder(current.conv);
    ui.older.hidden = !(historyLoaded && more && shown.size > 0);
    ui.older.disabled = historyInFlight;
  }

  ui.older.addEventListener('click', () => {
    const c = current;
    if (!c || historyInFlight) return;
    historyInFlight = true;
    updateOlder();
    const s = ui.scroller;
    const fromBottom = s.scrollHeight - s.scrollTop;
    client.loadOlder(c.conv).then(
      () => {
        if (current !== c) return;
        historyInFlight = false;
        updateOlder();
        s.scrollTop = s.scrollHeight - fromBottom;
      },
      () => {
        historyInFlight = false;
        updateOlder();
      },
    );
  });

  function isOwner() {
    return !!(roomInfo && roomInfo.owners && roomInfo.owners.includes(uid));
  }

  function buildMessage(m, own) {
    const li = el('li', 'msg ' + (own ? 'own' : 'other'));
    li.dataset.conv = m.conv;
    const bubble = el('div', 'bubble');
    const from = el('div', 'from');
    from.textContent = m.from || '';
    from.style.setProperty('--avatar-hue', String(hue(m.from || '?')));
    const body = el('div', 'body');
    const meta = el('div', 'meta');
    const edited = el('span', 'edited', 'edited');
    const seq = el('span', 'seq');
    const time = el('time', 'time');
    const mark = el('span', 'mark');
    meta.append(edited, seq, time, mark);
    const actions = el('div', 'actions');
    bubble.append(from, body, meta, actions);
    li.append(bubble);
    return li;
  }

  function fillMessage(li, m) {
    li.dataset.seq = String(m.seq);
    li.dataset.id = m.id || '';
    li.dataset.ts = String(m.ts || '');
    li.dataset.from = m.from || '';
    li.classList.toggle('deleted', !!m.deleted);
    li.querySelector('.body').textContent = m.deleted ? 'This message was deleted' : m.body || '';
    li.querySelector('.edited').hidden = !m.edited || !!m.deleted;
    li.querySelector('.seq').textContent = '#' + m.seq;
    const time = li.querySelector('.time');
    if (m.ts) {
      time.textContent = timeOf(m.ts);
      time.dateTime = new Date(m.ts).toISOString();
      time.title = new Date(m.ts).toLocaleString();
    }
    fillActions(li, m);
  }

  function fillActions(li, m) {
    const actions = li.querySelector('.actions');
    clear(actions);
    if (m.deleted || !m.seq) return;
    const own = m.from === uid;
    const canDelete = own || (current && current.kind === 'room' && isOwner());
    if (own) {
      const edit = el('button', 'action', 'Edit');
      edit.type = 'button';
      edit.dataset.action = 'edit';
      edit.addEventListener('click', () => startEdit(m.seq));
      actions.appendChild(edit);
    }
    if (canDelete) {
      const del = el('button', 'action danger', 'Delete');
      del.type = 'button';
      del.dataset.action = 'delete';
      del.addEventListener('click', () => confirmDelete(li, m.seq));
      actions.appendChild(del);
    }
  }

  function confirmDelete(li, seq) {
    const actions = li.querySelector('.actions');
    clear(actions);
    actions.classList.add('confirming');
    const q = el('span', 'confirm-text', 'Delete for everyone?');
    const yes = el('button', 'action danger', 'Delete');
    yes.type = 'button';
    yes.dataset.action = 'confirm-delete';
    const no = el('button', 'action', 'Cancel');
    no.type = 'button';
    no.dataset.action = 'cancel-delete';
    const done = () => {
      actions.classList.remove('confirming');
      const m = client.message(current.conv, seq);
      if (m) fillActions(li, m);
    };
    yes.addEventListener('click', () => {
      done();
      try {
        client.delete(current.conv, seq).sent.catch((e) => toast('Not deleted: ' + e.message, 'error'));
      } catch (e) {
        toast(e.message, 'error');
      }
    });
    no.addEventListener('click', done);
    actions.append(q, yes, no);
  }

  /** Where a message element goes: by seq, before the pending ones. */
  function place(li, seq) {
    let node = ui.list.firstElementChild;
    while (node) {
      if (node.classList.contains('msg')) {
        const s = node.dataset.seq;
        if (!s || Number(s) > seq) break;
      }
      node = node.nextElementSibling;
    }
    ui.list.insertBefore(li, node);
  }

  function showMessage(m) {
    if (!current || m.conv !== current.conv) return;
    const stick = stuckToBottom || nearBottom();
    let li = shown.get(m.seq);
    if (!li) {
      li = buildMessage(m, m.from === uid);
      li.dataset.state = m.from === uid ? 'stored' : 'received';
      shown.set(m.seq, li);
      fillMessage(li, m);
      place(li, m.seq);
    } else {
      fillMessage(li, m);
    }
    afterChange(stick);
  }

  function showPending(entry) {
    if (!current || entry.conv !== current.conv || entry.kind !== 'send' || pendingShown.has(entry.clientId)) return;
    const stick = true;
    const li = buildMessage({ from: uid }, true);
    li.dataset.state = 'pending';
    li.dataset.clientId = entry.clientId;
    li.dataset.seq = '';
    li.dataset.from = uid;
    li.dataset.ts = String(entry.created);
    li.querySelector('.body').textContent = entry.body;
    li.querySelector('.edited').hidden = true;
    li.querySelector('.time').textContent = timeOf(entry.created);
    const mark = li.querySelector('.mark');
    mark.dataset.mark = 'pending';
    mark.title = 'Sending…';
    pendingShown.set(entry.clientId, li);
    ui.list.appendChild(li);
    afterChange(stick);
  }

  let layoutSoon = false;
  function afterChange(stick) {
    updateEmpty();
    updateOlder();
    if (stick) scrollToBottom();
    if (layoutSoon) return;
    layoutSoon = true;
    // A timer, not requestAnimationFrame: a page in a background tab is drawn too.
    setTimeout(() => {
      layoutSoon = false;
      layout();
      renderMarks();
      if (stuckToBottom) scrollToBottom();
    }, 16);
  }

  /** Day separators and runs of messages from the same sender. */
  function layout() {
    for (const d of Array.from(ui.list.querySelectorAll('.day'))) d.remove();
    let prev = null;
    for (const li of Array.from(ui.list.children)) {
      const ts = Number(li.dataset.ts) || Date.now();
      if (!prev || !sameDay(new Date(Number(prev.dataset.ts) || Date.now()), new Date(ts))) {
        const d = el('li', 'day');
        d.appendChild(el('span', null, dayLabel(ts)));
        ui.list.insertBefore(d, li);
        prev = null;
      }
      const cont = !!prev && prev.dataset.from === li.dataset.from && ts - (Number(prev.dataset.ts) || ts) < 5 * 60000;
      li.classList.toggle('cont', cont);
      li.classList.toggle('room-msg', !!current && current.kind === 'room');
      prev = li;
    }
  }

  client.on('message', ({ message, clientId }) => {
    if (current && message.conv === current.conv) {
      if (current.kind === 'room' && roomInfo && !roomInfo.members.includes(message.from)) refreshRoomInfoSoon();
      if (clientId && pendingShown.has(clientId)) {
        const li = pendingShown.get(clientId);
        pendingShown.delete(clientId);
        li.remove();
      }
      showMessage(message);
      markReadIfSeen();
    }
  });

  client.on('update', ({ message }) => {
    if (current && message.conv === current.conv && shown.has(message.seq)) showMessage(message);
    if (editing && message.deleted && editing.seq === message.seq) cancelEdit();
  });

  client.on('pending', ({ entry }) => showPending(entry));

  client.on('sent', ({ clientId }) => {
    const li = pendingShown.get(clientId);
    if (li) {
      pendingShown.delete(clientId);
      li.remove();
      updateEmpty();
    }
  });

  client.on('failed', ({ clientId, entry, error }) => {
    const li = pendingShown.get(clientId);
    const why = error.code === 'not_member' ? 'you are not a member' : error.message || error.code;
    if (li) {
      pendingShown.delete(clientId);
      li.dataset.state = 'failed';
      const mark = li.querySelector('.mark');
      mark.dataset.mark = 'failed';
      mark.textContent = 'Not sent: ' + why;
    } else if (current && entry.conv === current.conv) {
      toast((entry.kind === 'edit' ? 'Not edited: ' : entry.kind === 'delete' ? 'Not deleted: ' : 'Not sent: ') + why, 'error');
    }
  });

  client.on('error', (e) => {
    if (e.code === 'rate_limited') toast('Slow down a little.', 'error');
  });

  // ---------------------------------------------------------------- marks

  function markReadIfSeen() {
    if (!current || !current.ready || client.state !== 'open') return;
    if (document.visibilityState !== 'visible' || !nearBottom()) return;
    client.markRead(current.conv);
  }
  document.addEventListener('visibilitychange', markReadIfSeen);
  window.addEventListener('focus', markReadIfSeen);

  let marksSoon = false;
  function renderMarks() {
    if (marksSoon) return;
    marksSoon = true;
    setTimeout(() => {
      marksSoon = false;
      if (!current) return;
      const conv = current.conv;
      let lastOwn = 0;
      for (const [seq, li] of shown) if (li.classList.contains('own') && seq > lastOwn) lastOwn = seq;
      for (const [seq, li] of shown) {
        if (!li.classList.contains('own') || li.classList.contains('deleted')) continue;
        const mark = li.querySelector('.mark');
        const seen = client.seenBy(conv, seq);
        let kind;
        let text;
        if (current.kind === 'dm') {
          kind = seen.length ? 'seen' : client.deliveredTo(conv, seq).length ? 'delivered' : 'sent';
          text = kind === 'seen' ? 'Seen' : kind === 'delivered' ? 'Delivered' : 'Sent';
        } else {
          kind = seen.length ? 'seen' : 'sent';
          text = seen.length ? 'Seen by ' + seen.length : 'Sent';
        }
        mark.dataset.mark = kind;
        mark.dataset.seenBy = String(seen.length);
        mark.title = current.kind === 'room' && seen.length ? 'Seen by ' + seen.join(', ') : text;
        mark.setAttribute('aria-label', mark.title);
        // The words under the newest of your messages (and "seen by N" in rooms).
        mark.textContent = seq === lastOwn || (current.kind === 'room' && seen.length) ? text : '';
      }
    }, 16);
  }
  client.on('receipt', ({ conv, uid: who }) => {
    if (current && conv === current.conv && who !== uid) renderMarks();
  });
  client.on('receipts', ({ conv }) => {
    if (current && conv === current.conv) renderMarks();
  });

  // ---------------------------------------------------------------- typing

  client.on('typing', ({ conv, uid: who, active }) => {
    let set = typingByConv.get(conv);
    if (!set) typingByConv.set(conv, (set = new Set()));
    if (active) set.add(who);
    else set.delete(who);
    if (current && conv === current.conv) renderTyping();
    const li = ui.inbox.querySelector('.conv-item[data-conv="' + CSS.escape(conv) + '"]');
    const item = client.conversation(conv);
    if (li && item) fillInboxItem(li, item);
  });

  function renderTyping() {
    const who = current ? client.typingIn(current.conv) : [];
    let text = '';
    if (who.length === 1) text = current.kind === 'dm' ? who[0] + ' is typing…' : who[0] + ' is typing…';
    else if (who.length === 2) text = who[0] + ' and ' + who[1] + ' are typing…';
    else if (who.length > 2) text = who.length + ' people are typing…';
    ui.typing.textContent = text;
    ui.typing.classList.toggle('active', !!text);
  }

  // ---------------------------------------------------------------- presence

  function renderPresence() {
    if (!current || current.kind !== 'dm') {
      ui.presence.hidden = true;
      return;
    }
    ui.presence.hidden = false;
    const on = client.state === 'open' ? client.online(current.peer) : undefined;
    ui.presence.dataset.online = on === true ? 'true' : on === false ? 'false' : '';
    ui.presence.textContent = on === true ? 'online' : on === false ? 'offline' : '';
  }

  client.on('presence', ({ uid: who, room }) => {
    if (current && current.kind === 'dm' && who === current.peer && !room) renderPresence();
    if (current && current.kind === 'room' && room === current.room) {
      if (roomInfo && !roomInfo.members.includes(who)) refreshRoomInfoSoon();
      else renderMembers();
    }
    const conv = uid ? dmConv(uid, who) : null;
    const li = conv && ui.inbox.querySelector('.conv-item[data-conv="' + CSS.escape(conv) + '"]');
    const item = conv && client.conversation(conv);
    if (li && item) fillInboxItem(li, item);
  });

  // ---------------------------------------------------------------- rooms

  function refreshRoomInfo() {
    const c = current;
    client.roomInfo(c.room).then(
      (info) => {
        if (current !== c) return;
        roomInfo = info;
        const priv = info.private ? 'Private room' : 'Public room';
        ui.roomMeta.textContent = priv + ' · ' + info.count + (info.count === 1 ? ' member' : ' members');
        ui.memberCount.textContent = String(info.count);
        renderMembers();
        for (const [seq, li] of shown) {
          const m = client.message(c.conv, seq);
          if (m) fillActions(li, m);
        }
        const ids = (info.members || []).filter((m) => m !== uid).slice(0, 100);
        if (ids.length) client.watchPresence(ids, false).then(renderMembers, () => {});
      },
      () => {},
    );
  }

  let roomInfoTimer = null;
  function refreshRoomInfoSoon() {
    if (roomInfoTimer) return;
    roomInfoTimer = setTimeout(() => {
      roomInfoTimer = null;
      if (current && current.kind === 'room' && current.ready) refreshRoomInfo();
    }, 300);
  }

  function renderMembers() {
    if (!roomInfo || !current || current.kind !== 'room') return;
    const owner = isOwner();
    ui.addMember.hidden = !owner;
    clear(ui.memberList);
    const members = (roomInfo.members || []).slice().sort((a, b) => {
      const oa = roomInfo.owners.includes(a) ? 0 : 1;
      const ob = roomInfo.owners.includes(b) ? 0 : 1;
      return oa - ob || (a < b ? -1 : a > b ? 1 : 0);
    });
    const onlineIn = new Set(client.onlineIn(current.room));
    for (const m of members) {
      const li = el('li', 'member');
      li.dataset.uid = m;
      const wrap = el('span', 'avatar-wrap');
      const av = el('span', 'avatar small');
      paintAvatar(av, m, false);
      const dot = el('span', 'dot');
      const on = m === uid ? true : onlineIn.has(m) || client.online(m) === true;
      dot.dataset.online = on ? 'true' : 'false';
      wrap.append(av, dot);
      const name = el('span', 'member-name', m === uid ? m + ' (you)' : m);
      li.append(wrap, name);
      if (roomInfo.owners.includes(m)) li.appendChild(el('span', 'role', 'owner'));
      if (owner && m !== uid) {
        const rm = el('button', 'action', 'Remove');
        rm.type = 'button';
        rm.dataset.action = 'remove';
        rm.addEventListener('click', () => removeMember(m, false));
        const ban = el('button', 'action danger', 'Ban');
        ban.type = 'button';
        ban.dataset.action = 'ban';
        ban.addEventListener('click', () => removeMember(m, true));
        const acts = el('span', 'member-actions');
        acts.append(rm, ban);
        li.appendChild(acts);
      }
      ui.memberList.appendChild(li);
    }
  }

  function memberError(text) {
    ui.memberError.textContent = text;
    ui.memberError.hidden = !text;
  }

  async function removeMember(who, ban) {
    const c = current;
    memberError('');
    try {
      await client.remove(c.room, who, { ban });
      toast((ban ? 'Banned ' : 'Removed ') + who + '.', 'info');
      if (current === c) refreshRoomInfo();
    } catch (e) {
      memberError(capitalise(e.message));
    }
  }

  ui.addMember.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const c = current;
    const who = ui.addMemberInput.value.trim();
    if (!validId(who)) return memberError('Ids use letters, digits and _ . - only.');
    memberError('');
    try {
      await client.add(c.room, who);
      ui.addMemberInput.value = '';
      toast('Added ' + who + '.', 'info');
      if (current === c) refreshRoomInfo();
    } catch (e) {
      memberError(capitalise(e.message));
    }
  });

  function togglePanel(open) {
    const show = open === undefined ? ui.panel.hidden : open;
    ui.panel.hidden = !show;
    ui.membersToggle.setAttribute('aria-expanded', String(show));
    root.classList.toggle('panel-open', show);
  }
  ui.membersToggle.addEventListener('click', () => {
    togglePanel();
    if (!ui.panel.hidden && current && current.kind === 'room' && current.ready) refreshRoomInfo();
  });
  ui.membersClose.addEventListener('click', () => togglePanel(false));

  ui.leaveRoom.addEventListener('click', async () => {
    const c = current;
    if (!c || c.kind !== 'room') return;
    try {
      await client.leave(c.room);
    } catch (e) {
      toast(capitalise(e.message), 'error');
    }
  });

  client.on('room', ({ room, joined, by }) => {
    const here = current && current.kind === 'room' && current.room === room;
    if (joined) {
      if (by) toast(by + ' added you to #' + room + '.', 'info', here ? null : roomConv(room));
      if (here && !current.ready) loadConv();
      else if (here) refreshRoomInfo();
    } else if (here) {
      current.ready = false;
      togglePanel(false);
      showRefusal(
        by ? by + ' removed you from #' + room : 'You left #' + room,
        by ? 'You no longer get its messages. An owner can add you again.' : 'You no longer get its messages.',
        by ? null : { label: 'Join again', run: () => enterRoom() },
      );
      clear(ui.list);
      shown = new Map();
      ui.typing.textContent = '';
    } else if (by) {
      toast(by + ' removed you from #' + room + '.', 'info');
    }
  });

  client.on('member', ({ room }) => {
    if (current && current.kind === 'room' && current.room === room) refreshRoomInfo();
  });

  // ---------------------------------------------------------------- composer

  function renderComposerState() {
    const usable = !!current && !current.refused && (current.kind === 'dm' || current.ready || client.state !== 'open');
    ui.input.disabled = !usable;
    ui.sendButton.disabled = !usable;
    ui.input.placeholder = usable ? (current.kind === 'room' ? 'Message #' + current.room : 'Message ' + current.peer) : '';
  }

  function autosize() {
    const t = ui.input;
    t.style.height = 'auto';
    t.style.height = Math.min(t.scrollHeight + 2, 160) + 'px';
    t.style.overflowY = t.scrollHeight > 160 ? 'auto' : 'hidden';
  }

  function submit() {
    const c = current;
    if (!c) return;
    const body = ui.input.value;
    if (!body.trim()) return;
    try {
      if (editing) {
        client.edit(c.conv, editing.seq, body);
        cancelEdit();
      } else {
        client.send(c.conv, body);
      }
    } catch (e) {
      toast(e instanceof ChatError && e.code === 'too_large' ? 'That message is too long.' : capitalise(e.message), 'error');
      return;
    }
    ui.input.value = '';
    autosize();
    scrollToBottom();
    ui.input.focus();
  }

  ui.form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    submit();
  });
  ui.input.addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      submit();
    } else if (ev.key === 'Escape' && editing) {
      cancelEdit();
    }
  });
  ui.input.addEventListener('input', () => {
    autosize();
    if (current && ui.input.value.trim() && !editing) client.typing(current.conv);
  });

  function startEdit(seq) {
    const m = client.message(current.conv, seq);
    if (!m || m.deleted) return;
    editing = { seq };
    ui.editBar.hidden = false;
    ui.input.value = m.body || '';
    autosize();
    ui.input.focus();
    for (const li of shown.values()) li.classList.toggle('editing', li === shown.get(seq));
  }

  function cancelEdit() {
    if (!editing) return;
    editing = null;
    ui.editBar.hidden = true;
    ui.input.value = '';
    autosize();
    for (const li of shown.values()) li.classList.remove('editing');
  }
  ui.editCancel.addEventListener('click', cancelEdit);

  // ---------------------------------------------------------------- notices

  /** A notice over the top of the conversation: it never moves the messages. */
  function toast(text, kind, conv) {
    const li = el('li', 'toast ' + (kind || 'info'));
    const span = el('span', null, text);
    li.appendChild(span);
    if (conv) {
      const open = el('button', 'link-button', 'Open');
      open.type = 'button';
      open.addEventListener('click', () => openConv(conv, {}));
      li.appendChild(open);
    }
    const close = el('button', 'toast-close', '×');
    close.type = 'button';
    close.setAttribute('aria-label', 'Dismiss');
    close.addEventListener('click', () => li.remove());
    li.appendChild(close);
    ui.toasts.appendChild(li);
    while (ui.toasts.children.length > 3) ui.toasts.firstElementChild.remove();
    setTimeout(() => li.remove(), kind === 'error' ? 8000 : 5000);
  }

  // ---------------------------------------------------------------- start

  if (!wantedTo && !wantedRoom) closeConv();
  else if (uid && !wantedRoom) {
    firstOpen = false;
    openConv(dmConv(uid, wantedTo), { replace: true });
  } else if (wantedRoom) {
    firstOpen = false;
    openConv(roomConv(wantedRoom), { replace: true });
  }
  client.connect();

  // For tests and debugging (the pages do not use it).
  window.chatmesh = {
    client,
    get conv() {
      return current ? current.conv : null;
    },
    /** Connected, synced, the open conversation's latest page loaded, nothing unsent. */
    settled() {
      return (
        client.state === 'open' &&
        !client.syncing &&
        (!current || (historyLoaded && !historyInFlight)) &&
        client.pending(current ? current.conv : undefined).length === 0
      );
    },
    open(conv) {
      openConv(conv, {});
    },
  };
}
