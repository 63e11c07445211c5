#!/usr/bin/env python3
"""A storm of group read receipts against a running cluster, and how long "read by" takes to
catch up. Used by read-bitmaps.sh; standard library only.

The owner (`<prefix>0`) creates a group of `--members` seeded users (`<prefix>1..`), sends
`--messages` messages to it over WebSocket, then every member posts one receipt for all of them
at once (`--threads` at a time). Reported: the receipts' latency (p50, p99, max) and wall time,
and the time from the first receipt until every message's `reads` shows every member.
Tokens are minted with the cluster's HS256 secret (users seeded by `sai-im admin seed-users`).
"""

import argparse
import base64
import concurrent.futures
import hashlib
import hmac
import json
import os
import socket
import time
import urllib.request


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token(secret: str, user: str) -> str:
    now = int(time.time())
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps({"sub": user, "iat": now, "exp": now + 3600, "gen": 0}).encode())
    sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def http(base: str, method: str, path: str, tok: str, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method)
    req.add_header("Authorization", f"Bearer {tok}")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"{}")


class Ws:
    """The least WebSocket client: text frames out (masked), text frames in."""

    def __init__(self, addr: str, tok: str):
        host, port = addr.rsplit(":", 1)
        self.s = socket.create_connection((host, int(port)))
        key = base64.b64encode(os.urandom(16)).decode()
        self.s.sendall(
            (
                f"GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                f"Sec-WebSocket-Protocol: {tok}\r\n\r\n"
            ).encode()
        )
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.s.recv(4096)
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n")[0]:
            raise RuntimeError(head.decode(errors="replace"))

    def send(self, obj):
        payload = json.dumps(obj).encode()
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            hdr = bytes([0x81, 0x80 | n])
        else:
            hdr = bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
        self.s.sendall(hdr + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def _take(self, n):
        while len(self.buf) < n:
            chunk = self.s.recv(65536)
            if not chunk:
                raise RuntimeError("connection closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv(self):
        while True:
            b0, b1 = self._take(2)
            n = b1 & 0x7F
            if n == 126:
                n = int.from_bytes(self._take(2), "big")
            elif n == 127:
                n = int.from_bytes(self._take(8), "big")
            payload = self._take(n)
            if b0 & 0x0F == 1:
                return json.loads(payload)


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--http", required=True)
    ap.add_argument("--ws", required=True)
    ap.add_argument("--secret", required=True)
    ap.add_argument("--prefix", default="rb")
    ap.add_argument("--members", type=int, default=200)
    ap.add_argument("--messages", type=int, default=20)
    ap.add_argument("--threads", type=int, default=32)
    a = ap.parse_args()
    owner = f"{a.prefix}0"
    members = [f"{a.prefix}{i}" for i in range(1, a.members + 1)]
    toks = {u: token(a.secret, u) for u in [owner] + members}
    g = http(a.http, "POST", "/v1/groups", toks[owner], {"name": "storm", "memberIds": members})
    gid = g["groupId"]
    conv = f"sg_{gid}"
    ws = Ws(a.ws, toks[owner])
    for i in range(1, a.messages + 1):
        ws.send({"frameType": 0, "id": f"m{i}", "method": "conversation.chat",
                 "data": {"chatType": 1, "recvId": gid, "clientMsgId": f"rb{i}",
                          "msg": {"mType": 0, "content": f"storm {i}"}}})
        while True:
            f = ws.recv()
            if f.get("id") == f"m{i}":
                assert f["data"]["seq"] == i, f
                break

    def receipt(u):
        t = time.perf_counter()
        r = http(a.http, "POST", f"/v1/conversations/{conv}/read", toks[u], {"readSeq": a.messages})
        assert r["readSeq"] == a.messages, r
        return time.perf_counter() - t

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(a.threads) as pool:
        lat = list(pool.map(receipt, members))
    answered = time.perf_counter() - start
    pending = set(range(1, a.messages + 1))
    while pending:
        for seq in sorted(pending):
            r = http(a.http, "GET", f"/v1/conversations/{conv}/messages/{seq}/reads", toks[owner])
            if r["readCount"] == a.members:
                pending.discard(seq)
        if time.perf_counter() - start > 600:
            raise SystemExit(f"read by never caught up: {sorted(pending)} short")
        if pending:
            time.sleep(0.01)
    complete = time.perf_counter() - start
    ms = lambda s: round(s * 1000, 1)
    print(json.dumps({
        "members": a.members, "messages": a.messages, "receipts": len(lat),
        "receipt_ms": {"p50": ms(pct(lat, 0.5)), "p99": ms(pct(lat, 0.99)), "max": ms(max(lat))},
        "all_receipts_answered_ms": ms(answered),
        "read_by_complete_ms": ms(complete),
    }))


if __name__ == "__main__":
    main()
