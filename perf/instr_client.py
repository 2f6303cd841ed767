#!/usr/bin/env python3
"""A fixed number of HTTP/1.1 requests for perf/instructions.sh (load to 127.0.0.1 only).

  instr_client.py PORT N CONNS MODE PATH       MODE: ka (keep-alive) or close (new connection
                                              per request); {i} in PATH becomes the request's number
  instr_client.py --idle PORT N HOLD_SECONDS   opens N connections, one request each, then holds
                                              them idle (prints "idle open" once they are all open)

Exits non-zero when an answer is not 200, so a broken run is not measured as a fast one.
"""
import socket
import sys
import threading
import time

HOST = "127.0.0.1"


def read_response(s, buf):
    while b"\r\n\r\n" not in buf:
        d = s.recv(65536)
        if not d:
            raise EOFError("connection closed before a response head")
        buf += d
    head, rest = buf.split(b"\r\n\r\n", 1)
    length = 0
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v)
    while len(rest) < length:
        d = s.recv(65536)
        if not d:
            raise EOFError("connection closed in a body")
        rest += d
    return head.startswith(b"HTTP/1.1 200"), rest[length:]


def load(port, n, conns, mode, path):
    lock = threading.Lock()
    state = {"next": 0, "bad": 0, "errors": []}

    def worker():
        s, buf = None, b""
        try:
            while True:
                with lock:
                    if state["next"] >= n:
                        break
                    i = state["next"]
                    state["next"] += 1
                if s is None:
                    s, buf = socket.create_connection((HOST, port), timeout=60), b""
                extra = b"Connection: close\r\n" if mode == "close" else b""
                s.sendall(b"GET " + path.replace("{i}", str(i)).encode()
                          + b" HTTP/1.1\r\nHost: bench\r\n" + extra + b"\r\n")
                ok, buf = read_response(s, buf)
                if not ok:
                    with lock:
                        state["bad"] += 1
                if mode == "close":
                    s.close()
                    s = None
        except Exception as e:  # reported below, the run fails
            with lock:
                state["errors"].append(repr(e))
        finally:
            if s is not None:
                s.close()

    threads = [threading.Thread(target=worker) for _ in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if state["bad"] or state["errors"]:
        print(f"instr_client: {state['bad']} answers not 200, errors: {state['errors'][:3]}",
              file=sys.stderr)
        sys.exit(1)


def idle(port, n, hold):
    socks = []
    for _ in range(n):
        s = socket.create_connection((HOST, port), timeout=60)
        s.sendall(b"GET /b64 HTTP/1.1\r\nHost: bench\r\n\r\n")
        socks.append(s)
    for s in socks:
        ok, _ = read_response(s, b"")
        if not ok:
            sys.exit(1)
    print("idle open", flush=True)
    time.sleep(hold)


if __name__ == "__main__":
    if sys.argv[1] == "--idle":
        idle(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
    else:
        load(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
