#!/usr/bin/env python3
"""A login flood: N clients, each on its own keep-alive HTTP connection, each posting wrong
passwords for one account in a closed loop capped at --rate-per-client requests/s, for
--duration seconds. Prints one JSON object: answers by status and per-client rate.

Used by scripts/login-flood.sh (issue 10, item 4). The per-client cap keeps the flood's own CPU
small on a machine it shares with the server: the point is what the server spends, not what
the attacker does."""
import argparse, http.client, json, threading, time

def client(host, port, account, rate, until, counts, lock):
    conn = http.client.HTTPConnection(host, port, timeout=30)
    body = json.dumps({"username": account, "password": "wrong password"})
    gap = 1.0 / rate
    nxt = time.monotonic()
    while time.monotonic() < until:
        try:
            conn.request("POST", "/v1/users/login", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            key = str(resp.status)
        except Exception as e:  # the server may close a connection; open a new one
            key = type(e).__name__
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=30)
        with lock:
            counts[key] = counts.get(key, 0) + 1
        nxt += gap
        pause = nxt - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        else:
            nxt = time.monotonic()

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--http", default="127.0.0.1:18081")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rate-per-client", type=float, default=20)
    ap.add_argument("--duration", type=float, default=20)
    ap.add_argument("--prefix", default="load")
    a = ap.parse_args()
    host, port = a.http.rsplit(":", 1)
    counts, lock = {}, threading.Lock()
    until = time.monotonic() + a.duration
    ts = [threading.Thread(target=client, args=(host, int(port), f"{a.prefix}{i}", a.rate_per_client, until, counts, lock))
          for i in range(a.clients)]
    for t in ts: t.start()
    for t in ts: t.join()
    total = sum(counts.values())
    print(json.dumps({"clients": a.clients, "duration_s": a.duration, "requests": total,
                      "per_s": round(total / a.duration, 1), "by_status": counts}))

if __name__ == "__main__":
    main()
