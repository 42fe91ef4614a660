#!/usr/bin/env python3
"""Smoke test of a running chatmesh cluster (e.g. nginx/local-cluster.sh), stdlib only.

    nginx/smoke-test.py [--nginx URL] NODE_URL NODE_URL

Checks /readyz through nginx, then opens a websocket as one user on the first node and
as another on the second (their `welcome` frames must name different nodes) and one as
a third user through nginx, puts all three in one room, and checks that a direct
message crosses from the first node to the second and a room message from the second
node reaches the other two, each sender getting `sent`. Every network wait has a
timeout. Exits 0 when everything arrived, 1 otherwise.

Example, with the cluster of local-cluster.sh:
    nginx/smoke-test.py --nginx http://127.0.0.1:8080 http://127.0.0.1:8081 http://127.0.0.1:8083
"""

import argparse
import base64
import json
import os
import socket
import struct
import sys
import time
import urllib.parse
import urllib.request

TIMEOUT = 10.0


class WebSocket:
    """A minimal RFC 6455 client: text frames out (masked), text frames in."""

    def __init__(self, url: str):
        u = urllib.parse.urlsplit(url)
        self.sock = socket.create_connection((u.hostname, u.port or 80), timeout=TIMEOUT)
        key = base64.b64encode(os.urandom(16)).decode()
        path = u.path + ("?" + u.query if u.query else "")
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {u.netloc}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        )
        self.sock.sendall(request.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise RuntimeError(f"{url}: connection closed during the handshake")
            head += chunk
        head, self.buf = head.split(b"\r\n\r\n", 1)
        status = head.split(b"\r\n", 1)[0].decode()
        if " 101 " not in status + " ":
            raise RuntimeError(f"{url}: no upgrade: {status}")

    def send(self, obj) -> None:
        payload = json.dumps(obj).encode()
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            header = struct.pack("!BB", 0x81, 0x80 | n)
        elif n < 65536:
            header = struct.pack("!BBH", 0x81, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", 0x81, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def _read(self, n: int, deadline: float) -> bytes:
        while len(self.buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no frame in time")
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("connection closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv(self, deadline: float):
        """The next text frame as JSON; answers pings; raises on close or timeout."""
        while True:
            b0, b1 = self._read(2, deadline)
            opcode, n = b0 & 0x0F, b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", self._read(2, deadline))
            elif n == 127:
                (n,) = struct.unpack("!Q", self._read(8, deadline))
            payload = self._read(n, deadline)
            if opcode == 0x9:  # ping: pong with the same payload, masked
                mask = os.urandom(4)
                masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
                self.sock.sendall(struct.pack("!BB", 0x8A, 0x80 | n) + mask + masked)
            elif opcode == 0x8:
                raise RuntimeError(f"closed by the server: {payload!r}")
            elif opcode == 0x1:
                return json.loads(payload)

    def expect(self, pred, what: str):
        """Frames until one satisfies pred (others are skipped), within TIMEOUT."""
        deadline = time.monotonic() + TIMEOUT
        seen = []
        try:
            while True:
                frame = self.recv(deadline)
                if pred(frame):
                    return frame
                seen.append(frame)
        except TimeoutError:
            raise RuntimeError(f"no {what} within {TIMEOUT}s; got instead: {seen}") from None

    def close(self) -> None:
        try:
            mask = os.urandom(4)
            self.sock.sendall(struct.pack("!BB", 0x88, 0x80 | 2) + mask +
                              bytes(b ^ mask[i] for i, b in enumerate(struct.pack("!H", 1000))))
        finally:
            self.sock.close()


def ws_url(base: str, uid: str) -> str:
    u = urllib.parse.urlsplit(base)
    return f"ws://{u.netloc}/ws?uid={uid}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nginx", help="nginx's base URL: /readyz and a third user through it")
    ap.add_argument("node_a", help="base URL of one node, e.g. http://127.0.0.1:8081")
    ap.add_argument("node_b", help="base URL of another node")
    args = ap.parse_args()

    tag = os.urandom(3).hex()
    alice, bob, carol, room = f"alice-{tag}", f"bob-{tag}", f"carol-{tag}", f"lobby-{tag}"
    ok = True

    if args.nginx:
        with urllib.request.urlopen(args.nginx.rstrip("/") + "/readyz", timeout=TIMEOUT) as r:
            print(f"GET {args.nginx}/readyz: {r.status}")
            ok &= r.status == 200

    a = WebSocket(ws_url(args.node_a, alice))
    b = WebSocket(ws_url(args.node_b, bob))
    wa = a.expect(lambda f: f.get("type") == "welcome", "welcome")
    wb = b.expect(lambda f: f.get("type") == "welcome", "welcome")
    print(f"{alice} on {wa['node']}, {bob} on {wb['node']}")
    if wa["node"] == wb["node"]:
        print("FAIL: both users are on the same node")
        ok = False
    users = [(alice, a), (bob, b)]
    if args.nginx:
        c = WebSocket(ws_url(args.nginx, carol))
        wc = c.expect(lambda f: f.get("type") == "welcome", "welcome")
        print(f"{carol} through nginx, on {wc['node']}")
        users.append((carol, c))

    for uid, ws in users:
        ws.send({"type": "join", "room": room})
        ws.expect(lambda f: f.get("type") == "joined" and f.get("room") == room, "joined")
    print(f"all joined room {room}")

    # A direct message, first node to second.
    a.send({"type": "direct", "to": bob, "body": "hello across nodes", "client_id": "dm1"})
    sent = a.expect(lambda f: f.get("type") == "sent" and f.get("client_id") == "dm1", "sent")
    got = b.expect(lambda f: f.get("type") == "message" and f.get("from") == alice, "direct message")
    good = got["body"] == "hello across nodes" and got["seq"] == sent["seq"] and got["conv"] == sent["conv"]
    print(f"direct {alice} -> {bob}: sent seq {sent['seq']} in {sent['conv']}; "
          f"{bob} got {got['body']!r} seq {got['seq']}: {'ok' if good else 'FAIL'}")
    ok &= good

    # A room message from the second node to everyone else.
    b.send({"type": "room", "room": room, "body": "hello room", "client_id": "r1"})
    sent = b.expect(lambda f: f.get("type") == "sent" and f.get("client_id") == "r1", "sent")
    for uid, ws in users:
        if ws is b:
            continue
        got = ws.expect(lambda f: f.get("type") == "message" and f.get("room") == room, "room message")
        good = got["body"] == "hello room" and got["from"] == bob and got["seq"] == sent["seq"]
        print(f"room {room} from {bob}: {uid} got {got['body']!r} seq {got['seq']}: "
              f"{'ok' if good else 'FAIL'}")
        ok &= good

    for _, ws in users:
        ws.close()
    print("smoke test: " + ("PASS" if ok else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (OSError, RuntimeError, KeyError, ValueError) as e:
        print(f"smoke test: FAIL: {e}", file=sys.stderr)
        sys.exit(1)
