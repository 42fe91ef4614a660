// Socket.IO 4 chat server with the Redis adapter: the comparison peer of chatmesh-bench.
//
// The same two chat operations as chatmesh, the idiomatic Socket.IO way:
// - every socket authenticates with `auth: {uid}` (or `?uid=`) and joins the room `user:<uid>`;
// - `direct` {to, body, client_id}: `message` to every socket of `to` and to the sender's
//   other sockets (one broadcast through the adapter), ack {ok:true};
// - `join` {room}: joins `room:<room>`, ack {ok:true};
// - `room` {room, body, client_id}: `message` to the room's other sockets, ack {ok:true}.
// Nothing is stored: this is plain pub/sub over Redis, which is what Socket.IO offers.
//
// Env: PORT (default 3000), HOST (default 127.0.0.1), REDIS_URL (unset: no adapter,
// single process), NODE_ID (a label for logs).
"use strict";

const http = require("http");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");

const PORT = Number(process.env.PORT || 3000);
const HOST = process.env.HOST || "127.0.0.1";
const REDIS_URL = process.env.REDIS_URL || "";
const NODE_ID = process.env.NODE_ID || `sio-${process.pid}`;
const ID_RE = /^[A-Za-z0-9_.-]{1,64}$/;
const MAX_BODY = 4096;

function validId(v) {
  return typeof v === "string" && ID_RE.test(v);
}

async function main() {
  const httpServer = http.createServer((req, res) => {
    if (req.url === "/healthz" || req.url === "/readyz") {
      res.writeHead(200, { "content-type": "text/plain" });
      res.end("ok\n");
      return;
    }
    res.writeHead(404);
    res.end();
  });
  const io = new Server(httpServer, {
    transports: ["websocket"],
    serveClient: false,
    perMessageDeflate: false,
    maxHttpBufferSize: 64 * 1024,
  });

  let clients = [];
  if (REDIS_URL) {
    const pub = createClient({ url: REDIS_URL });
    const sub = pub.duplicate();
    for (const c of [pub, sub]) {
      c.on("error", (e) => console.error(`${NODE_ID}: redis error: ${e.message}`));
    }
    await Promise.all([pub.connect(), sub.connect()]);
    io.adapter(createAdapter(pub, sub));
    clients = [pub, sub];
  }

  io.use((socket, next) => {
    const uid = (socket.handshake.auth && socket.handshake.auth.uid) || socket.handshake.query.uid;
    if (!validId(uid)) {
      next(new Error("unauthorized"));
      return;
    }
    socket.data.uid = uid;
    next();
  });

  io.on("connection", (socket) => {
    const uid = socket.data.uid;
    socket.join(`user:${uid}`);

    socket.on("direct", (msg, ack) => {
      if (!msg || !validId(msg.to) || typeof msg.body !== "string" || msg.body.length > MAX_BODY) {
        if (typeof ack === "function") ack({ ok: false, error: "invalid" });
        return;
      }
      socket.to([`user:${msg.to}`, `user:${uid}`]).emit("message", {
        from: uid,
        to: msg.to,
        body: msg.body,
        client_id: msg.client_id,
        ts: Date.now(),
      });
      if (typeof ack === "function") ack({ ok: true });
    });

    socket.on("join", (msg, ack) => {
      if (!msg || !validId(msg.room)) {
        if (typeof ack === "function") ack({ ok: false, error: "invalid" });
        return;
      }
      socket.join(`room:${msg.room}`);
      if (typeof ack === "function") ack({ ok: true });
    });

    socket.on("room", (msg, ack) => {
      if (!msg || !validId(msg.room) || typeof msg.body !== "string" || msg.body.length > MAX_BODY) {
        if (typeof ack === "function") ack({ ok: false, error: "invalid" });
        return;
      }
      if (!socket.rooms.has(`room:${msg.room}`)) {
        if (typeof ack === "function") ack({ ok: false, error: "not_member" });
        return;
      }
      socket.to(`room:${msg.room}`).emit("message", {
        from: uid,
        room: msg.room,
        body: msg.body,
        client_id: msg.client_id,
        ts: Date.now(),
      });
      if (typeof ack === "function") ack({ ok: true });
    });
  });

  httpServer.listen(PORT, HOST, () => {
    console.log(`${NODE_ID} listening on http://${HOST}:${PORT} (redis: ${REDIS_URL || "none"})`);
  });

  const stop = () => {
    io.close(() => {
      Promise.allSettled(clients.map((c) => c.quit())).then(() => process.exit(0));
    });
    setTimeout(() => process.exit(0), 3000).unref();
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main().catch((e) => {
  console.error(`${NODE_ID}: ${e.stack || e}`);
  process.exit(1);
});
