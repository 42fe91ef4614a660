// chatmesh web client: plain JS, no build step, no libraries.
//
// Two pages load this file:
//   - the start page (form#start-form): keeps the unused field out of the query;
//   - the chat page (main#chat): speaks the websocket protocol of the contract
//     (section 3): welcome / join / sync / history / presence / direct / room.
//
// Message text is only ever put into the page with textContent / createTextNode.
(function () {
  'use strict';

  var started = false;
  function init() {
    if (started) return;
    started = true;
    var start = document.getElementById('start-form');
    if (start) startPage(start);
    var chat = document.getElementById('chat');
    if (chat) chatPage(chat);
  }
  // A `defer` script runs once the document is parsed (readyState "interactive").
  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init);
  else init();

  // ---------------------------------------------------------------- start page

  function startPage(form) {
    var to = form.querySelector('input[name="to"]');
    var room = form.querySelector('input[name="room"]');
    var err = document.getElementById('start-error');

    function showError(text) {
      if (!err) return;
      err.textContent = text;
      err.hidden = !text;
    }

    form.addEventListener('submit', function (ev) {
      var kind = ev.submitter && ev.submitter.dataset ? ev.submitter.dataset.kind : '';
      if (!kind) kind = to.value && !room.value ? 'to' : room.value && !to.value ? 'room' : '';
      if (!kind) {
        ev.preventDefault();
        showError('Fill in a person or a room.');
        return;
      }
      var used = kind === 'to' ? to : room;
      var unused = kind === 'to' ? room : to;
      if (!used.value) {
        ev.preventDefault();
        showError(kind === 'to' ? 'Whom do you want to talk to?' : 'Which room?');
        used.focus();
        return;
      }
      showError('');
      // A disabled field is not submitted: the query has exactly one of to / room.
      unused.disabled = true;
    });

    // Coming back with the back button (bfcache): make both fields usable again.
    window.addEventListener('pageshow', function () {
      to.disabled = false;
      room.disabled = false;
    });
  }

  // ---------------------------------------------------------------- chat page

  function chatPage(root) {
    var cfg = {
      uid: root.dataset.uid || '',
      to: root.dataset.to || '',
      room: root.dataset.room || '',
      conv: root.dataset.conv || '',
      node: root.dataset.node || '',
    };
    var query = new URLSearchParams(location.search);
    var token = query.get('token');
    var isRoom = !!cfg.room;

    var el = {
      title: document.getElementById('chat-title'),
      conn: document.getElementById('conn-status'),
      presence: document.getElementById('presence'),
      members: document.getElementById('members'),
      status: document.getElementById('status-msg'),
      notices: document.getElementById('notices'),
      scroller: document.getElementById('scroller'),
      older: document.getElementById('load-older'),
      list: document.getElementById('messages'),
      form: document.getElementById('send-form'),
      input: document.getElementById('send-input'),
    };

    var BACKOFF_MIN = 500;
    var BACKOFF_MAX = 15000;
    var PRESENCE_EVERY = 10000;
    var RESEND_AFTER = 15000; // a send with no answer this long is sent again
    var MAX_BODY_BYTES = 4096;
    var HISTORY_LIMIT = 50;

    var state = {
      me: cfg.uid,
      conv: cfg.conv,
      status: 'connecting', // connecting | online | reconnecting | closed
      welcomed: false, // welcome received on the current socket
      ready: false, // welcomed and (DM page, or joined the room)
      joined: !isRoom,
      attempt: 0,
      node: '',
      cursors: {}, // conv -> highest seq seen (mirrored in localStorage)
      bySeq: new Map(), // seq -> element, this page's conversation
      pending: new Map(), // client_id -> {body, el, lastSent, retryAt, tries}
      historyLoaded: false, // the latest page of history was asked on this page load
      historyInFlight: false,
      hasOlder: false,
      syncing: false,
      online: new Set(), // room page: members online
      known: new Set(), // room page: members we know of (for presence questions)
      peerOnline: null,
    };

    var ws = null;
    var reconnectTimer = null;
    var countdownTimer = null;
    var presenceTimer = null;
    var statusTimer = null;
    var encoder = typeof TextEncoder === 'function' ? new TextEncoder() : null;

    // ------------------------------------------------------------ storage

    function cursorKey() {
      return 'chatmesh:cursors:' + state.me;
    }
    function outboxKey() {
      return 'chatmesh:outbox:' + state.me + ':' + state.conv;
    }
    function loadJSON(key, fallback) {
      try {
        var v = JSON.parse(localStorage.getItem(key));
        return v && typeof v === 'object' ? v : fallback;
      } catch (e) {
        return fallback;
      }
    }
    function saveJSON(key, value) {
      try {
        localStorage.setItem(key, JSON.stringify(value));
      } catch (e) {
        /* storage full or disabled: the page still works */
      }
    }
    function loadCursors() {
      var c = loadJSON(cursorKey(), {});
      var out = {};
      Object.keys(c).forEach(function (k) {
        if (typeof c[k] === 'number' && c[k] > 0) out[k] = c[k];
      });
      state.cursors = out;
    }
    // Raises the cursor of `conv` to `seq`; merges with what other tabs stored.
    function bumpCursor(conv, seq) {
      if (typeof seq !== 'number' || !conv) return;
      var stored = loadJSON(cursorKey(), {});
      Object.keys(stored).forEach(function (k) {
        if (typeof stored[k] === 'number' && !(state.cursors[k] >= stored[k])) {
          state.cursors[k] = stored[k];
        }
      });
      if (!(state.cursors[conv] >= seq)) state.cursors[conv] = seq;
      saveJSON(cursorKey(), state.cursors);
    }
    function saveOutbox() {
      var list = [];
      state.pending.forEach(function (p, id) {
        if (!p.failed) list.push({ client_id: id, body: p.body, created: p.created });
      });
      if (list.length) saveJSON(outboxKey(), list);
      else {
        try {
          localStorage.removeItem(outboxKey());
        } catch (e) {
          /* ignore */
        }
      }
    }

    // ------------------------------------------------------------ helpers

    function newClientId() {
      if (window.crypto && typeof window.crypto.randomUUID === 'function') {
        return window.crypto.randomUUID();
      }
      var bytes = new Uint8Array(16);
      if (window.crypto && window.crypto.getRandomValues) window.crypto.getRandomValues(bytes);
      else for (var i = 0; i < 16; i++) bytes[i] = Math.floor(Math.random() * 256);
      return Array.prototype.map
        .call(bytes, function (b) {
          return (b + 256).toString(16).slice(1);
        })
        .join('');
    }

    function byteLength(s) {
      return encoder ? encoder.encode(s).length : unescape(encodeURIComponent(s)).length;
    }

    function formatTime(ts) {
      if (typeof ts !== 'number') return '';
      var d = new Date(ts);
      var now = new Date();
      var opts = { hour: '2-digit', minute: '2-digit' };
      if (d.toDateString() !== now.toDateString()) {
        opts.year = 'numeric';
        opts.month = 'short';
        opts.day = 'numeric';
      }
      try {
        return d.toLocaleString([], opts);
      } catch (e) {
        return d.toISOString();
      }
    }

    function chatLink(params) {
      var q = new URLSearchParams();
      q.set('uid', state.me);
      Object.keys(params).forEach(function (k) {
        q.set(k, params[k]);
      });
      if (token) q.set('token', token);
      return '/chat?' + q.toString();
    }

    function peerOf(msg) {
      if (msg.room) return null;
      if (msg.from && msg.from !== state.me) return msg.from;
      if (msg.to && msg.to !== state.me) return msg.to;
      // dm:A:B
      var parts = String(msg.conv || '').split(':');
      if (parts.length === 3) return parts[1] === state.me ? parts[2] : parts[1];
      return null;
    }

    function send(frame) {
      if (!ws || ws.readyState !== WebSocket.OPEN) return false;
      try {
        ws.send(JSON.stringify(frame));
        return true;
      } catch (e) {
        return false;
      }
    }

    // ------------------------------------------------------------ status

    function setConn(kind, text) {
      state.status = kind;
      el.conn.className = 'conn conn-' + kind;
      el.conn.textContent = text;
      root.dataset.conn = kind;
    }

    function showStatus(text, ms) {
      if (!el.status) return;
      el.status.textContent = text;
      el.status.hidden = false;
      clearTimeout(statusTimer);
      statusTimer = setTimeout(function () {
        el.status.hidden = true;
        el.status.textContent = '';
      }, ms || 5000);
    }

    // ------------------------------------------------------------ rendering

    function nearBottom() {
      var s = el.scroller;
      return s.scrollHeight - s.scrollTop - s.clientHeight < 80;
    }
    function scrollToBottom() {
      el.scroller.scrollTop = el.scroller.scrollHeight;
    }

    function makeMessageEl(msg, own) {
      var li = document.createElement('li');
      li.className = 'msg ' + (own ? 'own' : 'other');
      li.dataset.conv = msg.conv || state.conv;
      li.dataset.seq = msg.seq != null ? String(msg.seq) : '';
      li.dataset.state = 'received';

      var meta = document.createElement('div');
      meta.className = 'meta';
      var from = document.createElement('span');
      from.className = 'from';
      from.textContent = own ? 'you' : msg.from || '?';
      var time = document.createElement('time');
      time.className = 'time';
      var mstate = document.createElement('span');
      mstate.className = 'mstate';
      meta.appendChild(from);
      meta.appendChild(document.createTextNode(' '));
      meta.appendChild(time);
      meta.appendChild(document.createTextNode(' '));
      meta.appendChild(mstate);

      var body = document.createElement('div');
      body.className = 'body';
      body.textContent = msg.body == null ? '' : String(msg.body);

      li.appendChild(meta);
      li.appendChild(body);
      setTime(li, msg.ts);
      return li;
    }

    function setTime(li, ts) {
      var time = li.querySelector('.time');
      if (typeof ts === 'number') {
        time.textContent = formatTime(ts);
        time.dateTime = new Date(ts).toISOString();
        time.title = new Date(ts).toLocaleString();
      }
    }

    function setState(li, s, note) {
      li.dataset.state = s;
      var label = li.querySelector('.mstate');
      var text = '';
      if (s === 'pending') text = 'sending…';
      else if (s === 'stored') text = '✓ #' + li.dataset.seq;
      else if (s === 'failed') text = 'not sent' + (note ? ': ' + note : '');
      label.textContent = text;
      label.title = s === 'stored' ? 'stored as message ' + li.dataset.seq : '';
    }

    // Inserts a stored element at its place by seq (pending ones stay at the end).
    function placeBySeq(li, seq) {
      var node = el.list.firstElementChild;
      while (node) {
        var s = node.dataset.seq;
        if (s === '' || Number(s) > seq) break;
        node = node.nextElementSibling;
      }
      el.list.insertBefore(li, node);
    }

    function updateOlderButton() {
      el.older.hidden = !(state.hasOlder && state.bySeq.size > 0);
      el.older.disabled = state.historyInFlight;
    }

    function lowestSeq() {
      var low = Infinity;
      state.bySeq.forEach(function (_, seq) {
        if (seq < low) low = seq;
      });
      return low === Infinity ? null : low;
    }

    // The highest seq such that every seq from the lowest shown up to it is shown:
    // a safe `sync` cursor for this page even if a live message overtook another.
    function contiguousTop() {
      var low = lowestSeq();
      if (low == null) return null;
      var s = low;
      while (state.bySeq.has(s + 1)) s++;
      return s;
    }

    // ------------------------------------------------------------ messages in

    function onMessage(msg) {
      if (!msg || typeof msg.conv !== 'string' || typeof msg.seq !== 'number') return;
      var before = state.cursors[msg.conv];
      bumpCursor(msg.conv, msg.seq);
      if (msg.conv === state.conv) {
        showMessage(msg);
        if (isRoom && msg.from) learnMember(msg.from);
      } else {
        // Another conversation: a small notice, unless it is old news (a first sync
        // of a conversation this browser had no cursor for) or our own message.
        var isNew = before == null ? !state.syncing : msg.seq > before;
        if (isNew && msg.from !== state.me) notice(msg);
      }
    }

    function showMessage(msg) {
      if (state.bySeq.has(msg.seq)) return; // duplicate (sync, history, live)
      var stick = nearBottom();
      var own = msg.from === state.me;
      var li = makeMessageEl(msg, own);
      li.dataset.id = msg.id || '';
      state.bySeq.set(msg.seq, li);
      setState(li, own ? 'stored' : 'received');
      placeBySeq(li, msg.seq);
      updateOlderButton();
      if (stick) scrollToBottom();
    }

    function notice(msg) {
      var key = msg.conv;
      var li = null;
      Array.prototype.forEach.call(el.notices.children, function (n) {
        if (n.dataset.conv === key) li = n;
      });
      if (!li) {
        li = document.createElement('li');
        li.className = 'notice';
        li.dataset.conv = key;
        li.dataset.count = '0';
        var a = document.createElement('a');
        a.href = msg.room ? chatLink({ room: msg.room }) : chatLink({ to: peerOf(msg) || '' });
        var close = document.createElement('button');
        close.type = 'button';
        close.className = 'notice-close';
        close.setAttribute('aria-label', 'dismiss');
        close.textContent = '×';
        close.addEventListener('click', function () {
          li.remove();
        });
        li.appendChild(a);
        li.appendChild(close);
        el.notices.appendChild(li);
        while (el.notices.children.length > 5) el.notices.firstElementChild.remove();
      }
      var n = Number(li.dataset.count) + 1;
      li.dataset.count = String(n);
      var what = n === 1 ? 'new message' : n + ' new messages';
      var where = msg.room ? ' in #' + msg.room : '';
      li.firstChild.textContent = what + ' from ' + (msg.from || '?') + where;
    }

    // ------------------------------------------------------------ sending

    function queueSend(body) {
      var id = newClientId();
      var li = makeMessageEl({ conv: state.conv, from: state.me, body: body, ts: Date.now() }, true);
      li.dataset.clientId = id;
      setState(li, 'pending');
      el.list.appendChild(li);
      var p = { body: body, el: li, lastSent: 0, retryAt: 0, tries: 0, created: Date.now() };
      state.pending.set(id, p);
      saveOutbox();
      scrollToBottom();
      trySend(id);
    }

    function sendFrame(id, body) {
      return isRoom
        ? { type: 'room', room: cfg.room, body: body, client_id: id }
        : { type: 'direct', to: cfg.to, body: body, client_id: id };
    }

    function trySend(id) {
      var p = state.pending.get(id);
      if (!p || p.failed || !state.ready) return;
      if (send(sendFrame(id, p.body))) {
        p.lastSent = Date.now();
        p.retryAt = 0;
        p.tries++;
      }
    }

    function flushPending(force) {
      if (!state.ready) return;
      var now = Date.now();
      state.pending.forEach(function (p, id) {
        if (p.failed) return;
        // After a (re)connect every unconfirmed send goes again (same client_id).
        var due = force || (p.retryAt ? now >= p.retryAt : !p.lastSent || now - p.lastSent > RESEND_AFTER);
        if (due) trySend(id);
      });
    }

    function onSent(f) {
      var p = state.pending.get(f.client_id);
      if (typeof f.seq === 'number' && f.conv) bumpCursor(f.conv, f.seq);
      if (!p) return; // another tab's send, or an answer to a resend already handled
      state.pending.delete(f.client_id);
      saveOutbox();
      var li = p.el;
      if (f.conv !== state.conv) {
        // Should not happen (the page sends to its own conversation only).
        li.remove();
        return;
      }
      var existing = state.bySeq.get(f.seq);
      if (existing) {
        // A copy (from sync) arrived before this answer: keep one element.
        li.remove();
        existing.className = 'msg own';
        existing.querySelector('.from').textContent = 'you';
        setState(existing, 'stored');
        return;
      }
      li.remove();
      li.dataset.seq = String(f.seq);
      li.dataset.id = f.id || '';
      setTime(li, f.ts);
      state.bySeq.set(f.seq, li);
      setState(li, 'stored');
      var stick = nearBottom();
      placeBySeq(li, f.seq);
      updateOlderButton();
      if (stick) scrollToBottom();
    }

    function onSendError(f) {
      var p = state.pending.get(f.client_id);
      if (!p) {
        showStatus(f.message || f.code || 'error');
        return;
      }
      if (f.code === 'unavailable' || f.code === 'rate_limited') {
        // Not confirmed: send again later with the same client_id (idempotent).
        var delay = Math.min(BACKOFF_MAX, 1000 * Math.pow(2, Math.min(p.tries, 4)));
        p.retryAt = Date.now() + delay * (0.75 + Math.random() * 0.5);
        p.el.querySelector('.mstate').textContent = 'sending… (retrying)';
        return;
      }
      p.failed = true;
      state.pending.delete(f.client_id);
      saveOutbox();
      setState(p.el, 'failed', f.message || f.code);
    }

    // ------------------------------------------------------------ sync / history

    function syncCursors() {
      var c = {};
      Object.keys(state.cursors).forEach(function (k) {
        c[k] = state.cursors[k];
      });
      // This page's own conversation: only as far as the page has it without gaps.
      if (state.historyLoaded) {
        var top = contiguousTop();
        if (top != null) c[state.conv] = top;
        else delete c[state.conv];
      }
      return c;
    }

    function startSync() {
      var cursors = syncCursors();
      state.syncing = true;
      send({ type: 'sync', cursors: cursors });
    }

    function onSynced(f) {
      var more = Array.isArray(f.more) ? f.more : [];
      if (more.length) {
        // More than a page waited in those conversations: ask again from the new cursors.
        send({ type: 'sync', cursors: syncCursors() });
      } else {
        state.syncing = false;
      }
      if (isRoom) askPresence();
    }

    function requestLatestHistory() {
      state.historyInFlight = true;
      updateOlderButton();
      send({ type: 'history', conv: state.conv, limit: HISTORY_LIMIT });
    }

    function requestOlder() {
      var low = lowestSeq();
      if (low == null || state.historyInFlight || !state.ready) return;
      state.historyInFlight = true;
      updateOlderButton();
      send({ type: 'history', conv: state.conv, before: low, limit: HISTORY_LIMIT });
    }

    function onHistory(f) {
      if (f.conv !== state.conv) return;
      state.historyInFlight = false;
      var first = !state.historyLoaded;
      state.historyLoaded = true;
      var msgs = Array.isArray(f.messages) ? f.messages : [];
      // Keep the view where it is when older messages are added above.
      var s = el.scroller;
      var fromBottom = s.scrollHeight - s.scrollTop;
      var stick = nearBottom();
      var top = 0;
      msgs.forEach(function (m) {
        if (typeof m.seq !== 'number') return;
        if (m.seq > top) top = m.seq;
        if (!m.conv) m.conv = f.conv;
        if (state.bySeq.has(m.seq)) return;
        var own = m.from === state.me;
        var li = makeMessageEl(m, own);
        li.dataset.id = m.id || '';
        state.bySeq.set(m.seq, li);
        setState(li, own ? 'stored' : 'received');
        placeBySeq(li, m.seq);
        if (isRoom && m.from) learnMember(m.from);
      });
      if (top) bumpCursor(f.conv, top);
      // The answer to "load older", or the first (latest) page: either tells whether
      // anything older than what is shown is kept.
      root.dataset.loaded = 'true';
      if (first || msgs.length === 0 || msgs[0].seq <= (lowestSeq() || Infinity)) state.hasOlder = !!f.more;
      updateOlderButton();
      if (stick) scrollToBottom();
      else s.scrollTop = s.scrollHeight - fromBottom;
    }

    // ------------------------------------------------------------ presence

    function renderPresence() {
      if (!el.presence) return;
      var on = state.peerOnline;
      el.presence.className =
        'presence ' + (on === true ? 'presence-online' : on === false ? 'presence-offline' : 'presence-unknown');
      el.presence.dataset.online = on === null ? '' : String(on);
      el.presence.textContent = cfg.to + ': ' + (on === true ? 'online' : on === false ? 'offline' : 'unknown');
    }

    function renderMembers() {
      if (!el.members) return;
      var names = Array.from(state.online);
      if (state.me && state.ready) names.push(state.me);
      names = Array.from(new Set(names)).sort();
      while (el.members.firstChild) el.members.removeChild(el.members.firstChild);
      names.forEach(function (name) {
        var li = document.createElement('li');
        li.dataset.uid = name;
        li.textContent = name === state.me ? name + ' (you)' : name;
        el.members.appendChild(li);
      });
    }

    var presenceSoon = null;
    // Remembers a member of this room; a new one is asked about shortly (batched).
    function learnMember(uid) {
      if (!uid || uid === state.me || state.known.has(uid)) return;
      state.known.add(uid);
      if (!presenceSoon && state.welcomed) {
        presenceSoon = setTimeout(function () {
          presenceSoon = null;
          askPresence();
        }, 300);
      }
    }

    function askPresence() {
      if (!state.welcomed) return;
      if (!isRoom) {
        send({ type: 'presence', uids: [cfg.to] });
        return;
      }
      var uids = Array.from(state.known).slice(0, 100);
      if (uids.length) send({ type: 'presence', uids: uids });
    }

    function onPresence(f) {
      if (typeof f.uid !== 'string') return;
      if (f.room != null) {
        if (!isRoom || f.room !== cfg.room) return;
        learnMember(f.uid);
        if (f.online) state.online.add(f.uid);
        else state.online.delete(f.uid);
        renderMembers();
        return;
      }
      if (isRoom) {
        // An answer to our question about members seen in this room.
        if (!state.known.has(f.uid) || f.uid === state.me) return;
        if (f.online) state.online.add(f.uid);
        else state.online.delete(f.uid);
        renderMembers();
      } else if (f.uid === cfg.to) {
        state.peerOnline = !!f.online;
        renderPresence();
      }
    }

    // ------------------------------------------------------------ connection

    function wsUrl() {
      var proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
      var q = token ? 'token=' + encodeURIComponent(token) : 'uid=' + encodeURIComponent(cfg.uid);
      return proto + '//' + location.host + '/ws?' + q;
    }

    function connect() {
      clearTimeout(reconnectTimer);
      clearInterval(countdownTimer);
      reconnectTimer = null;
      if (ws) return;
      setConn(state.attempt ? 'reconnecting' : 'connecting', state.attempt ? 'reconnecting…' : 'connecting…');
      var sock;
      try {
        sock = new WebSocket(wsUrl());
      } catch (e) {
        scheduleReconnect(false);
        return;
      }
      ws = sock;
      sock.onmessage = function (ev) {
        if (sock !== ws) return;
        var f;
        try {
          f = JSON.parse(ev.data);
        } catch (e) {
          return;
        }
        if (f && typeof f === 'object') handle(f);
      };
      sock.onclose = function (ev) {
        if (sock !== ws) return;
        ws = null;
        state.welcomed = false;
        state.ready = false;
        state.syncing = false;
        state.historyInFlight = false;
        clearInterval(presenceTimer);
        updateOlderButton();
        if (isRoom) {
          state.online.clear();
          renderMembers();
        }
        // 1012: the server restarts; another node (or this one) takes us at once.
        scheduleReconnect(ev.code === 1012);
      };
      sock.onerror = function () {
        /* onclose follows */
      };
    }

    function scheduleReconnect(prompt) {
      if (reconnectTimer) return;
      var delay;
      if (prompt) {
        delay = 100 + Math.random() * 400;
      } else {
        var base = Math.min(BACKOFF_MAX, BACKOFF_MIN * Math.pow(2, state.attempt));
        delay = base / 2 + Math.random() * (base / 2);
      }
      state.attempt++;
      var at = Date.now() + delay;
      var tick = function () {
        var secs = Math.max(0, Math.ceil((at - Date.now()) / 1000));
        setConn('reconnecting', secs > 0 ? 'reconnecting in ' + secs + 's' : 'reconnecting…');
      };
      tick();
      clearInterval(countdownTimer);
      countdownTimer = setInterval(tick, 1000);
      reconnectTimer = setTimeout(function () {
        reconnectTimer = null;
        clearInterval(countdownTimer);
        connect();
      }, delay);
    }

    function onWelcome(f) {
      state.welcomed = true;
      state.attempt = 0;
      state.node = f.node || '';
      if (typeof f.uid === 'string' && f.uid && f.uid !== state.me) {
        // JWT mode: the token's subject is who we are.
        state.me = f.uid;
        loadCursors();
      }
      setConn('online', 'connected' + (state.node ? ' (node ' + state.node + ')' : ''));
      var rooms = Array.isArray(f.rooms) ? f.rooms : [];
      if (isRoom && rooms.indexOf(cfg.room) < 0) {
        state.joined = false;
        send({ type: 'join', room: cfg.room });
        setConn('online', 'joining #' + cfg.room + '…');
      } else {
        state.joined = true;
        becomeReady();
      }
      clearInterval(presenceTimer);
      presenceTimer = setInterval(askPresence, PRESENCE_EVERY);
    }

    function becomeReady() {
      state.ready = true;
      setConn('online', 'connected' + (state.node ? ' (node ' + state.node + ')' : ''));
      if (!state.historyLoaded) requestLatestHistory();
      startSync();
      if (!isRoom) askPresence();
      renderMembers();
      flushPending(true);
    }

    function handle(f) {
      switch (f.type) {
        case 'welcome':
          onWelcome(f);
          break;
        case 'joined':
          if (isRoom && f.room === cfg.room && !state.ready && state.welcomed) {
            state.joined = true;
            becomeReady();
          }
          break;
        case 'left':
          if (isRoom && f.room === cfg.room) {
            state.joined = false;
            showStatus('You left #' + cfg.room + ' (in another window). Reload to join again.', 8000);
          }
          break;
        case 'message':
          onMessage(f);
          break;
        case 'sent':
          onSent(f);
          break;
        case 'synced':
          onSynced(f);
          break;
        case 'history':
          onHistory(f);
          break;
        case 'presence':
          onPresence(f);
          break;
        case 'error':
          if (f.client_id) onSendError(f);
          else {
            if (state.historyInFlight && f.code !== 'rate_limited') {
              state.historyInFlight = false;
              updateOlderButton();
            }
            showStatus((f.code ? f.code + ': ' : '') + (f.message || 'error'));
          }
          break;
        default:
          break;
      }
    }

    // ------------------------------------------------------------ wiring

    el.form.addEventListener('submit', function (ev) {
      ev.preventDefault();
      var body = el.input.value;
      if (!body.trim()) return;
      if (byteLength(body) > MAX_BODY_BYTES) {
        showStatus('Message too long (at most ' + MAX_BODY_BYTES + ' bytes).');
        return;
      }
      el.input.value = '';
      queueSend(body);
      el.input.focus();
    });

    el.older.addEventListener('click', requestOlder);

    // Keep the newest message in view when the window (or phone keyboard) resizes.
    var stuck = true;
    el.scroller.addEventListener('scroll', function () {
      stuck = nearBottom();
    });
    window.addEventListener('resize', function () {
      if (stuck) scrollToBottom();
    });

    window.addEventListener('online', function () {
      if (!ws) connect();
    });

    // Pending sends due for a retry, and sends never answered.
    setInterval(function () {
      flushPending(false);
    }, 1000);

    // Unconfirmed sends from an earlier visit of this page are sent again.
    loadCursors();
    loadJSON(outboxKey(), []).forEach(function (o) {
      if (!o || typeof o.client_id !== 'string' || typeof o.body !== 'string') return;
      var li = makeMessageEl({ conv: state.conv, from: state.me, body: o.body, ts: o.created }, true);
      li.dataset.clientId = o.client_id;
      setState(li, 'pending');
      el.list.appendChild(li);
      state.pending.set(o.client_id, {
        body: o.body,
        el: li,
        lastSent: 0,
        retryAt: 0,
        tries: 0,
        created: o.created || Date.now(),
      });
    });

    renderPresence();
    renderMembers();
    connect();

    // A small hook for debugging and tests (tests still drive the page through the DOM).
    window.chatmesh = {
      state: state,
      config: cfg,
      send: function (text) {
        el.input.value = String(text);
        el.form.requestSubmit ? el.form.requestSubmit() : queueSend(String(text));
      },
      reconnect: function () {
        if (ws) ws.close();
        else connect();
      },
    };
  }
})();
