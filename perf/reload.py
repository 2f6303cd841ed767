#!/usr/bin/env python3
"""Hot reload under load: see perf/reload.sh (which builds the release binary and runs this).

One ringway process (the gateway under test) in front of two origins: a second ringway process
answering 200 "hello" (fast, for wrk) and a Python thread that streams a chunked response slowly.
During a wrk run of DURATION seconds, with IDLE idle keep-alive connections and one streaming
response open, it reloads RELOADS times (SIGHUP, alternating two valid configs, with one invalid
config in the middle), then checks that every idle connection and the stream survived, then
reloads more times without load to compare the gateway's RSS after 1 reload and after TOTAL.
Loopback only; every wait is bounded.
"""

import argparse
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

WRK_JSON = re.compile(r"WRK_JSON (\{.*\})")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def threads_of(pid):
    return len(os.listdir(f"/proc/{pid}/task"))


class Proc:
    """A ringway process whose stderr lines are collected."""

    def __init__(self, binary, config, name):
        self.name = name
        self.lines = []
        self.cv = threading.Condition()
        self.p = subprocess.Popen(
            [binary, "run", "-c", config],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, RINGWAY_LOG="info"),
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stderr:
            with self.cv:
                self.lines.append(line.rstrip("\n"))
                self.cv.notify_all()

    def count(self, text):
        with self.cv:
            return sum(1 for l in self.lines if text in l)

    def wait_count(self, text, n, limit):
        end = time.time() + limit
        with self.cv:
            while sum(1 for l in self.lines if text in l) < n:
                left = end - time.time()
                if left <= 0:
                    return False
                self.cv.wait(left)
        return True

    def addr(self):
        if not self.wait_count("listening on ", 1, 30):
            sys.exit(f"{self.name} did not start: {self.lines[-20:]}")
        with self.cv:
            line = next(l for l in self.lines if "listening on " in l)
        host, port = line.split("listening on ")[1].split()[0].rsplit(":", 1)
        return host, int(port)

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(20)
            except subprocess.TimeoutExpired:
                self.p.kill()


def streaming_origin(duration, stats):
    """Listens on 127.0.0.1:0; answers each request with a chunked body written in 1 KiB
    chunks every 100 ms for `duration` seconds. Returns the port."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)

    def conn(c):
        try:
            c.recv(65536)
            c.sendall(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            end = time.time() + duration
            chunk = b"x" * 1024
            while time.time() < end:
                c.sendall(b"400\r\n" + chunk + b"\r\n")
                stats["origin_chunks"] += 1
                time.sleep(0.1)
            c.sendall(b"0\r\n\r\n")
            stats["origin_done"] = True
            time.sleep(1)
        except OSError as e:
            stats["origin_error"] = str(e)
        finally:
            c.close()

    def accept():
        while True:
            c, _ = srv.accept()
            threading.Thread(target=conn, args=(c,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return srv.getsockname()[1]


def stream_client(addr, stats, limit):
    """GETs /stream and reads to the terminal chunk; records bytes and whether it was cut."""
    try:
        s = socket.create_connection(addr, timeout=limit)
        s.settimeout(30)
        s.sendall(b"GET /stream HTTP/1.1\r\nHost: perf\r\n\r\n")
        got = b""
        while not got.endswith(b"0\r\n\r\n"):
            d = s.recv(65536)
            if not d:
                stats["stream_cut"] = True
                break
            got = got[-16:] + d
            stats["stream_bytes"] += len(d)
        else:
            stats["stream_complete"] = True
        s.close()
    except OSError as e:
        stats["stream_cut"] = True
        stats["stream_error"] = str(e)


def request(s):
    s.sendall(b"GET / HTTP/1.1\r\nHost: perf\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        d = s.recv(4096)
        if not d:
            return None
        data += d
    head, rest = data.split(b"\r\n\r\n", 1)
    m = re.search(rb"content-length: *(\d+)", head, re.I)
    need = int(m.group(1)) if m else 0
    while len(rest) < need:
        d = s.recv(4096)
        if not d:
            return None
        rest += d
    return int(head.split()[1])


def config(origin, stream_port, variant, workers):
    routes = (
        '[[routes]]\nname = "stream"\npath = "/stream"\nupstream = "streamer"\n\n'
        '[[routes]]\nname = "all"\npath_prefix = "/"\nupstream = "origin"\n'
        f'response_headers.set = {{ "x-config" = "{variant}" }}\n'
    )
    if variant == "b":
        routes = '[[routes]]\nname = "only-b"\npath = "/b"\ndirect = { status = 204 }\n\n' + routes
    if variant == "invalid":
        routes = routes.replace('upstream = "origin"', 'upstream = "nowhere"')
    return (
        f"[server]\nworkers = {workers}\n\n"
        '[timeouts]\nclient_idle = "900s"\nupstream_body = "120s"\n\n'
        '[[listeners]]\naddress = "127.0.0.1:0"\nbacklog = 4096\n\n'
        f'[upstreams.origin]\nendpoints = [{{ address = "{origin[0]}:{origin[1]}" }}]\n\n'
        f'[upstreams.streamer]\nendpoints = [{{ address = "127.0.0.1:{stream_port}" }}]\n\n'
        + routes
    )


def write(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--duration", type=int, default=15, help="load and stream seconds")
    ap.add_argument("--reloads", type=int, default=100, help="reloads during the load")
    ap.add_argument("--total-reloads", type=int, default=1000, help="reloads in all, for RSS")
    ap.add_argument("--idle", type=int, default=1000, help="idle keep-alive connections")
    ap.add_argument("--connections", type=int, default=64, help="wrk connections")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the JSON summary here too")
    a = ap.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    tmp = tempfile.mkdtemp(prefix="ringway-reload-perf-")
    stats = {
        "origin_chunks": 0,
        "origin_done": False,
        "stream_bytes": 0,
        "stream_cut": False,
        "stream_complete": False,
    }
    procs = []
    try:
        origin_cfg = os.path.join(tmp, "origin.toml")
        write(
            origin_cfg,
            f'[server]\nworkers = 1\n\n[[listeners]]\naddress = "127.0.0.1:0"\n\n'
            '[[routes]]\ndirect = { status = 200, body = "hello" }\n',
        )
        origin = Proc(a.binary, origin_cfg, "origin")
        procs.append(origin)
        origin_addr = origin.addr()
        # The stream outlasts the load by a few seconds (the checks run while it is open).
        stream_port = streaming_origin(a.duration + 5, stats)

        path = os.path.join(tmp, "ringway.toml")
        write(path, config(origin_addr, stream_port, "a", a.workers))
        gw = Proc(a.binary, path, "gateway")
        procs.append(gw)
        addr = gw.addr()
        pid = gw.p.pid
        rss_start = rss_kib(pid)

        idle = []
        idle_open_failed = 0
        for _ in range(a.idle):
            try:
                s = socket.create_connection(addr, timeout=10)
                if request(s) != 200:
                    idle_open_failed += 1
                idle.append(s)
            except OSError:
                idle_open_failed += 1
        st = threading.Thread(target=stream_client, args=(addr, stats, a.duration + 60))
        st.start()
        time.sleep(0.5)

        wrk = subprocess.Popen(
            [
                "wrk", "-t2", f"-c{a.connections}", f"-d{a.duration}s",
                "-s", os.path.join(os.path.dirname(__file__), "wrk_report.lua"),
                f"http://{addr[0]}:{addr[1]}/",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threads_before = threads_of(pid)
        rss_after_1 = None
        refused = 0
        ok = 0
        gap = a.duration * 0.8 / max(a.reloads, 1)
        variant = "a"
        invalid_at = a.reloads // 2
        t0 = time.time()
        for i in range(1, a.reloads + 1):
            variant = "b" if variant == "a" else "a"
            write(path, config(origin_addr, stream_port, variant, a.workers))
            os.kill(pid, signal.SIGHUP)
            if not gw.wait_count("reload #", i, 30):
                sys.exit(f"reload {i} did not happen: {gw.lines[-10:]}")
            ok += 1
            if i == 1:
                rss_after_1 = rss_kib(pid)
            if i == invalid_at:
                write(path, config(origin_addr, stream_port, "invalid", a.workers))
                os.kill(pid, signal.SIGHUP)
                if not gw.wait_count("reload refused", refused + 1, 30):
                    sys.exit("the invalid config was not refused")
                refused += 1
            time.sleep(gap)
        reload_secs = time.time() - t0
        out, _ = wrk.communicate(timeout=a.duration + 60)
        m = WRK_JSON.search(out)
        w = json.loads(m.group(1)) if m else {"raw": out}

        # Every idle connection is still open and answers.
        idle_failed = 0
        for s in idle:
            try:
                s.settimeout(10)
                if request(s) != 200:
                    idle_failed += 1
            except OSError:
                idle_failed += 1
        st.join(a.duration + 90)
        threads_after = threads_of(pid)
        rss_after_load = rss_kib(pid)

        # More reloads without load, up to the total: RSS after 1 vs after all of them.
        t1 = time.time()
        done = ok
        for i in range(done + 1, a.total_reloads + 1):
            variant = "b" if variant == "a" else "a"
            write(path, config(origin_addr, stream_port, variant, a.workers))
            os.kill(pid, signal.SIGHUP)
            if not gw.wait_count("reload #", i, 30):
                sys.exit(f"reload {i} did not happen")
            ok += 1
        quiet_secs = time.time() - t1
        rss_after_all = rss_kib(pid)
        threads_end = threads_of(pid)
        for s in idle:
            s.close()

        summary = {
            "duration_s": a.duration,
            "workers": a.workers,
            "wrk_connections": a.connections,
            "wrk": w,
            "reloads_under_load": a.reloads,
            "reloads_under_load_s": round(reload_secs, 2),
            "invalid_refused": refused,
            "reloads_total": ok,
            "reloads_quiet_s": round(quiet_secs, 2),
            "idle_connections": len(idle),
            "idle_open_failed": idle_open_failed,
            "idle_failed_after": idle_failed,
            "stream_bytes": stats["stream_bytes"],
            "stream_complete": stats["stream_complete"],
            "stream_cut": stats["stream_cut"],
            "rss_kib": {
                "start": rss_start,
                "after_1_reload": rss_after_1,
                "after_load": rss_after_load,
                f"after_{ok}_reloads": rss_after_all,
            },
            "threads": {"during": threads_before, "after_load": threads_after, "end": threads_end},
        }
        print(json.dumps(summary, indent=2))
        if a.out:
            with open(a.out, "w") as f:
                json.dump(summary, f, indent=2)
        failed = (
            (w.get("status", 1) or 0)
            + (w.get("connect", 1) or 0)
            + (w.get("read", 1) or 0)
            + (w.get("write", 1) or 0)
            + (w.get("timeout", 1) or 0)
        )
        bad = failed or idle_failed or idle_open_failed or not stats["stream_complete"]
        print(
            f"\nfailed requests (wrk status+socket errors): {failed}; idle connections cut: "
            f"{idle_failed}/{len(idle)}; stream complete: {stats['stream_complete']} "
            f"({stats['stream_bytes']} bytes); RSS after 1 reload {rss_after_1} KiB, after {ok} "
            f"reloads {rss_after_all} KiB; threads {threads_before} -> {threads_end}"
        )
        return 1 if bad else 0
    finally:
        for p in procs:
            p.stop()


if __name__ == "__main__":
    sys.exit(main())
