#!/usr/bin/env python3
"""End-to-end load comparison: ringway vs nginx vs haproxy in front of the same nginx origin.

Loopback only (127.0.0.1). Python standard library only. Normally started by perf/run.sh, which
builds ringway, installs missing tools, raises the file-descriptor limit and cleans up after it.

For every scenario the three proxies are started fresh, checked for correct responses, warmed
up, then measured with wrk in rounds: ringway, nginx, haproxy, ringway, nginx, haproxy, ...
Ratios to nginx are taken pair by pair within a round and the median over rounds is reported.
"""

import argparse
import datetime
import http.client
import json
import os
import platform
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

HOST = "127.0.0.1"  # every socket this script opens or configures uses this address
PORTS = {"origin": 18000, "ringway": 18080, "nginx": 18081, "haproxy": 18082}
TARGETS = ["ringway", "nginx", "haproxy"]  # A B C order within a round
BASELINE = "nginx"
BODIES = {  # name -> (size, path on the origin)
    "64B": (64, "/b64"),
    "4KiB": (4 << 10, "/b4k"),
    "64KiB": (64 << 10, "/b64k"),
    "1MiB": (1 << 20, "/b1m"),
}
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------
# /proc helpers


def proc_stat(pid):
    """(ppid, utime+stime ticks) of one process (all its threads), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except OSError:
        return None
    rest = data[data.rfind(")") + 2:].split()
    # rest[0] is field 3 (state); utime/stime are fields 14/15.
    return int(rest[1]), int(rest[11]) + int(rest[12])


def proc_tree(root):
    """The pid and all its descendants (nginx master + workers; ringway/haproxy: one process)."""
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = proc_stat(int(name))
        if st:
            children.setdefault(st[0], []).append(int(name))
    out, todo = [], [root]
    while todo and len(out) < 10000:
        p = todo.pop()
        if os.path.exists(f"/proc/{p}"):
            out.append(p)
            todo.extend(children.get(p, []))
    return out


def cpu_ticks(pids):
    total = 0
    for p in pids:
        st = proc_stat(p)
        if st:
            total += st[1]
    return total


def mem_kib(pids, field):
    """Sum of a /proc/PID/status field (VmRSS, VmHWM) in KiB over the processes."""
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


class RssSampler:
    """Samples the summed VmRSS of some processes every `interval` seconds, keeps the peak."""

    def __init__(self, pids, interval=0.2):
        self.pids, self.interval = pids, interval
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, mem_kib(self.pids, "VmRSS"))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *a):
        self._stop.set()
        self._t.join(5)
        self.peak = max(self.peak, mem_kib(self.pids, "VmRSS"))


# ------------------------------------------------------------------------------------------------
# Processes


class Procs:
    """Every process this script starts, each in its own session (process group = its pid).
    Their pids are appended to WORKDIR/pids so that run.sh's trap can kill leftovers."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.live = {}

    def start(self, name, argv, env=None, cwd=None):
        logf = open(os.path.join(self.workdir, f"{name}.log"), "ab")
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                             env=env, cwd=cwd, start_new_session=True)
        logf.close()
        with open(os.path.join(self.workdir, "pids"), "a") as f:
            f.write(f"{p.pid}\n")
        self.live[name] = p
        return p

    def alive(self, name):
        p = self.live.get(name)
        return p is not None and p.poll() is None

    def stop(self, name, timeout=15):
        p = self.live.pop(name, None)
        if p is None:
            return None
        if p.poll() is None:
            try:
                os.kill(p.pid, signal.SIGTERM)
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{name} (pid {p.pid}) did not stop within {timeout}s after SIGTERM; killing it")
            except ProcessLookupError:
                pass
        # Whatever is left in its process group (e.g. orphaned nginx workers).
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            pass
        return p.returncode

    def stop_all(self):
        for name in list(self.live):
            self.stop(name, timeout=5)


def port_open(port, timeout=0.2):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((HOST, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def wait_port(procs, name, port, limit=15.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if not procs.alive(name):
            return False
        if port_open(port):
            return True
        time.sleep(0.05)
    return False


def tail(path, n=30):
    try:
        with open(path, "rb") as f:
            lines = f.read().decode("utf-8", "replace").splitlines()
        return "\n".join(lines[-n:])
    except OSError:
        return ""


def pinned(cpus, argv):
    """argv run on the CPUs listed (taskset -c), or as it is when none are given."""
    return ["taskset", "-c", cpus] + argv if cpus else argv


# ------------------------------------------------------------------------------------------------
# Configs


def nginx_common(d, workers, conns):
    os.makedirs(d, exist_ok=True)
    return f"""worker_processes {workers};
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
worker_rlimit_nofile {conns};
events {{ worker_connections {max(512, conns - 1000)}; }}
"""


def temp_paths(d):
    return "".join(f"  {k}_temp_path {d}/{k}_temp;\n"
                   for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))


def origin_conf(d, www, workers, nofile):
    return nginx_common(d, workers, nofile) + f"""http {{
  access_log off;
{temp_paths(d)}  sendfile on;
  tcp_nopush on;
  tcp_nodelay on;
  keepalive_timeout 75s;
  keepalive_requests 1000000;
  open_file_cache max=64 inactive=600s;
  default_type application/octet-stream;
  server {{
    listen {HOST}:{PORTS['origin']} backlog=4096;
    root {www};
    location / {{ }}
  }}
}}
"""


def nginx_proxy_conf(d, workers, nofile):
    return nginx_common(d, workers, nofile) + f"""http {{
  access_log off;
{temp_paths(d)}  tcp_nodelay on;
  keepalive_timeout 75s;
  keepalive_requests 1000000;
  upstream origin {{
    server {HOST}:{PORTS['origin']};
    keepalive 256;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
  }}
  server {{
    listen {HOST}:{PORTS['nginx']} backlog=4096;
    location / {{
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_max_temp_file_size 0;
    }}
  }}
}}
"""


def haproxy_conf(workers, maxconn):
    return f"""global
  nbthread {workers}
  maxconn {maxconn}
  # With a hard open-file limit below 2 x maxconn, start anyway (a warning, not a failure).
  no strict-limits

defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  timeout http-request 10s
  timeout http-keep-alive 60s

frontend fe
  bind {HOST}:{PORTS['haproxy']} backlog 4096
  default_backend be

backend be
  http-reuse always
  server origin {HOST}:{PORTS['origin']}
"""


def ringway_conf(workers):
    return f"""[server]
workers = {workers}

[[listeners]]
address = "{HOST}:{PORTS['ringway']}"
backlog = 4096

[upstreams.origin]
endpoints = [{{ address = "{HOST}:{PORTS['origin']}" }}]
# max_idle is left at its default ("auto"): users run defaults.

[[routes]]
path_prefix = "/"
upstream = "origin"
"""


# ------------------------------------------------------------------------------------------------
# The bench


class Bench:
    def __init__(self, args):
        self.a = args
        self.workdir = args.workdir
        self.procs = Procs(self.workdir)
        self.nofile = self._nofile()
        self.www = os.path.join(self.workdir, "www")
        self.bodies = {}
        self.problems = []  # human-readable notes about misbehaviour, copied into the report
        self.lua = os.path.join(self.workdir, "wrk_report.lua")
        shutil.copy(os.path.join(HERE, "wrk_report.lua"), self.lua)

    @staticmethod
    def _nofile():
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        return soft if soft != resource.RLIM_INFINITY else 1 << 20

    def problem(self, msg):
        log("PROBLEM: " + msg)
        self.problems.append(msg)

    # -- origin ----------------------------------------------------------------------------------

    def make_files(self):
        os.makedirs(self.www, exist_ok=True)
        os.chmod(self.workdir, 0o755)
        os.chmod(self.www, 0o755)
        pattern = bytes(range(33, 127))  # printable, deterministic
        for name, (size, path) in BODIES.items():
            body = (pattern * (size // len(pattern) + 1))[:size]
            fp = os.path.join(self.www, path.lstrip("/"))
            with open(fp, "wb") as f:
                f.write(body)
            os.chmod(fp, 0o644)
            self.bodies[name] = body

    def start_origin(self):
        d = os.path.join(self.workdir, "origin")
        os.makedirs(d, exist_ok=True)
        conf = os.path.join(d, "nginx.conf")
        with open(conf, "w") as f:
            f.write(origin_conf(d, self.www, self.a.origin_workers, self.nofile))
        self.procs.start("origin", pinned(self.a.load_cpus,
                                          [self.a.nginx, "-p", d, "-c", conf, "-e", f"{d}/error.log"]))
        if not wait_port(self.procs, "origin", PORTS["origin"]):
            raise SystemExit("origin nginx did not start:\n" + tail(os.path.join(self.workdir, "origin.log"))
                             + tail(f"{d}/error.log"))

    # -- proxies ---------------------------------------------------------------------------------

    def start_proxy(self, target, workers):
        d = os.path.join(self.workdir, target)
        os.makedirs(d, exist_ok=True)
        if target == "ringway":
            conf = os.path.join(d, "ringway.toml")
            with open(conf, "w") as f:
                f.write(ringway_conf(workers))
            env = dict(os.environ, RINGWAY_LOG=os.environ.get("RINGWAY_LOG", "warn"))
            self.procs.start(target, pinned(self.a.proxy_cpus,
                                            [self.a.ringway, "run", "-c", conf, "--workers", str(workers)]), env=env)
        elif target == "nginx":
            conf = os.path.join(d, "nginx.conf")
            with open(conf, "w") as f:
                f.write(nginx_proxy_conf(d, workers, self.nofile))
            self.procs.start(target, pinned(self.a.proxy_cpus,
                                            [self.a.nginx, "-p", d, "-c", conf, "-e", f"{d}/error.log"]))
        elif target == "haproxy":
            conf = os.path.join(d, "haproxy.cfg")
            maxconn = max(1000, min(20000, self.nofile - 1000))
            with open(conf, "w") as f:
                f.write(haproxy_conf(workers, maxconn))
            self.procs.start(target, pinned(self.a.proxy_cpus, [self.a.haproxy, "-db", "-f", conf]))
        else:
            raise ValueError(target)
        if not wait_port(self.procs, target, PORTS[target]):
            raise SystemExit(f"{target} did not start:\n" + tail(os.path.join(self.workdir, f"{target}.log")))

    def start_proxies(self, workers):
        for t in self.a.targets:
            self.start_proxy(t, workers)

    def stop_proxies(self):
        for t in self.a.targets:
            rc = self.procs.stop(t)
            if rc not in (0, None, -signal.SIGTERM, 143) and t == "ringway":
                self.problem(f"ringway exited with status {rc} on SIGTERM; log tail:\n"
                             + tail(os.path.join(self.workdir, "ringway.log")))

    def check_alive(self, target, where):
        if self.procs.alive(target):
            return True
        p = self.procs.live.get(target)
        rc = p.returncode if p else None
        self.problem(f"{target} died during {where} (exit status {rc}); log tail:\n"
                     + tail(os.path.join(self.workdir, f"{target}.log")))
        return False

    def sanity(self, target, bodies):
        """Every body through the proxy: status 200 and exactly the origin's bytes, keep-alive and close."""
        ok = True
        for name in bodies:
            size, path = BODIES[name]
            for close in (False, True):
                try:
                    c = http.client.HTTPConnection(HOST, PORTS[target], timeout=10)
                    hdrs = {"Connection": "close"} if close else {}
                    for _ in range(2):  # twice on the same connection when keep-alive
                        c.request("GET", path, headers=hdrs)
                        r = c.getresponse()
                        data = r.read()
                        if r.status != 200 or data != self.bodies[name]:
                            self.problem(f"{target}: GET {path} ({'close' if close else 'keep-alive'}) gave "
                                         f"status {r.status}, {len(data)} bytes (want 200, {size} bytes, "
                                         f"same content: {data == self.bodies[name]})")
                            ok = False
                            break
                        if close:
                            break
                    c.close()
                except (OSError, http.client.HTTPException) as e:
                    self.problem(f"{target}: GET {path} ({'close' if close else 'keep-alive'}) failed: {e!r}")
                    ok = False
        return ok

    # -- one wrk run -----------------------------------------------------------------------------

    def wrk(self, target, sc, duration, measure=True):
        size, path = BODIES[sc["body"]]
        threads = max(1, min(self.a.wrk_threads, sc["conns"]))
        argv = pinned(self.a.load_cpus,
                      [self.a.wrk, "-t", str(threads), "-c", str(sc["conns"]), "-d", f"{int(duration)}s",
                       "--timeout", f"{self.a.wrk_timeout}s", "-s", self.lua])
        if sc["mode"] == "close":
            argv += ["-H", "Connection: close"]
        argv.append(f"http://{HOST}:{PORTS[target]}{path}")
        pids = proc_tree(self.procs.live[target].pid)
        rss_before = mem_kib(pids, "VmRSS")
        t0 = time.monotonic()
        c0 = cpu_ticks(pids)
        with RssSampler(pids) as rs:
            try:
                out = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                     timeout=duration + 60).stdout.decode("utf-8", "replace")
            except subprocess.TimeoutExpired:
                out = ""
                self.problem(f"wrk against {target} in {sc['name']} overran its time limit")
        c1 = cpu_ticks(pids)
        wall = time.monotonic() - t0
        alive = self.check_alive(target, sc["name"])
        res = None
        for line in out.splitlines():
            if line.startswith("WRK_JSON "):
                res = json.loads(line[len("WRK_JSON "):])
        if res is None:
            self.problem(f"no wrk result for {target} in {sc['name']}; wrk said:\n{out[-2000:]}")
            res = {"requests": 0, "bytes": 0, "duration_us": 0, "connect": 0, "read": 0, "write": 0,
                   "status": 0, "timeout": 0, "p50_us": 0, "p90_us": 0, "p99_us": 0, "p999_us": 0,
                   "lat_mean_us": 0, "lat_stdev_us": 0, "lat_max_us": 0}
        if not measure:
            return res
        req = res["requests"]
        secs = res["duration_us"] / 1e6 if res["duration_us"] else duration
        cpu_s = (c1 - c0) / CLK_TCK
        res.update({
            "target": target,
            "rps": req / secs if secs else 0.0,
            "cpu_s": cpu_s,
            "cpu_us_per_req": cpu_s * 1e6 / req if req else None,
            "cpu_util": cpu_s / wall if wall else None,  # cores busy on average
            "rss_before_kib": rss_before,
            "rss_peak_kib": rs.peak,
            "hwm_sum_kib": mem_kib(pids, "VmHWM"),
            "processes": len(pids),
            "errors": res["connect"] + res["read"] + res["write"] + res["timeout"] + res["status"],
            "bytes_per_req": res["bytes"] / req if req else 0,
            "alive_after": alive,
        })
        # A response shorter than the body means something was cut (headers make it longer).
        if req and res["bytes_per_req"] < size:
            self.problem(f"{target} in {sc['name']}: {res['bytes_per_req']:.0f} bytes per response on "
                         f"average, less than the {size}-byte body")
        return res

    # -- scenarios -------------------------------------------------------------------------------

    def run_scenario(self, sc):
        log(f"scenario {sc['name']}: starting proxies with {sc['workers']} worker(s)")
        self.start_proxies(sc["workers"])
        try:
            for t in self.a.targets:
                self.sanity(t, [sc["body"]])
            if self.a.warmup > 0:
                for t in self.a.targets:
                    if self.procs.alive(t):
                        self.wrk(t, sc, self.a.warmup, measure=False)
            runs = {t: [] for t in self.a.targets}
            for r in range(self.a.rounds):
                for t in self.a.targets:
                    if not self.procs.alive(t):
                        runs[t].append(None)
                        continue
                    time.sleep(self.a.pause)
                    res = self.wrk(t, sc, self.a.duration)
                    res["round"] = r
                    runs[t].append(res)
                    log(f"  round {r + 1}/{self.a.rounds} {t:8s} {res['rps']:10.0f} req/s  "
                        f"p50 {fmt_us(res['p50_us'])}  p99 {fmt_us(res['p99_us'])}  "
                        f"cpu {fmt_num(res['cpu_us_per_req'], 1)} us/req  errors {res['errors']}")
        finally:
            self.stop_proxies()
        sc = dict(sc)
        sc["runs"] = runs
        sc["summary"] = summarize(runs, self.a.targets)
        return sc

    # -- idle connections ------------------------------------------------------------------------

    def idle_test(self, workers, n):
        log(f"idle test: {n} keep-alive connections per proxy, {workers} worker(s)")
        out = {}
        for t in self.a.targets:
            self.start_proxy(t, workers)
            try:
                out[t] = self.idle_one(t, n)
            finally:
                self.procs.stop(t)
            r = out[t]
            log(f"  {t:8s} held {r['held']}/{n}  rss {r['rss_before_kib']} -> {r['rss_after_kib']} KiB  "
                f"= {fmt_num(r['bytes_per_conn'], 0)} B/conn")
        base = out.get(BASELINE, {}).get("bytes_per_conn")
        for t, r in out.items():
            r["ratio_vs_nginx"] = (r["bytes_per_conn"] / base
                                   if base and r.get("bytes_per_conn") is not None else None)
        return {"workers": workers, "connections": n, "results": out}

    def idle_one(self, target, n):
        port = PORTS[target]
        size, path = BODIES["64B"]
        req = f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode()
        # Warm the proxy up (lazy allocations, upstream pool) before the baseline.
        for _ in range(50):
            c = http.client.HTTPConnection(HOST, port, timeout=5)
            try:
                c.request("GET", path)
                c.getresponse().read()
            except (OSError, http.client.HTTPException):
                pass
            c.close()
        time.sleep(0.5)
        pids = proc_tree(self.procs.live[target].pid)
        before = mem_kib(pids, "VmRSS")
        sel = selectors.DefaultSelector()
        socks, done, failed = [], [], 0
        deadline = time.monotonic() + self.a.idle_timeout
        batch = max(1, self.a.idle_batch)
        i = 0
        while i < n and time.monotonic() < deadline:
            # Open a batch; each socket: connect -> send the request -> read one full response.
            pending = {}
            for _ in range(min(batch, n - i)):
                i += 1
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                try:
                    s.connect_ex((HOST, port))
                except OSError:
                    s.close()
                    failed += 1
                    continue
                pending[s.fileno()] = [s, b"", False]  # sock, bytes read, request sent
                sel.register(s, selectors.EVENT_WRITE)
            while pending and time.monotonic() < deadline:
                for key, ev in sel.select(timeout=1.0):
                    st = pending.get(key.fd)
                    if st is None:
                        continue
                    s = st[0]
                    try:
                        if not st[2]:
                            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                            if err:
                                raise OSError(err, os.strerror(err))
                            s.send(req)
                            st[2] = True
                            sel.modify(s, selectors.EVENT_READ)
                            continue
                        chunk = s.recv(65536)
                        if not chunk:
                            raise OSError("closed before the response was complete")
                        st[1] += chunk
                        head_end = st[1].find(b"\r\n\r\n")
                        if head_end >= 0:
                            head = st[1][:head_end].decode("latin-1").lower()
                            clen = 0
                            for line in head.split("\r\n")[1:]:
                                if line.startswith("content-length:"):
                                    clen = int(line.split(":", 1)[1])
                            if len(st[1]) >= head_end + 4 + clen:
                                if not head.startswith("http/1.1 200"):
                                    raise OSError("status " + head.split("\r\n")[0])
                                sel.unregister(s)
                                del pending[key.fd]
                                done.append(s)
                    except OSError:
                        sel.unregister(s)
                        del pending[key.fd]
                        s.close()
                        failed += 1
            for st in pending.values():  # timed out
                sel.unregister(st[0])
                st[0].close()
                failed += 1
        opened_s = self.a.idle_timeout - max(0.0, deadline - time.monotonic())
        time.sleep(self.a.idle_settle)
        samples = []
        for _ in range(5):
            samples.append(mem_kib(pids, "VmRSS"))
            time.sleep(0.2)
        after = max(samples)
        # Still open? A server-side close shows up as readable (EOF).
        probe = selectors.DefaultSelector()
        for s in done:
            probe.register(s, selectors.EVENT_READ)
        closed = len(probe.select(timeout=0))
        probe.close()
        alive = self.check_alive(target, "idle test")
        for s in done:
            s.close()
        sel.close()
        held = len(done) - closed
        if failed:
            self.problem(f"idle test: {failed} of {n} connections to {target} failed")
        delta = (after - before) * 1024
        return {
            "requested": n, "completed": len(done), "held": held, "failed": failed,
            "closed_by_server": closed, "seconds_to_open": round(opened_s, 2),
            "rss_before_kib": before, "rss_after_kib": after,
            "rss_delta_kib": after - before,
            "bytes_per_conn": delta / held if held else None,
            "alive_after": alive, "processes": len(pids),
        }


# ------------------------------------------------------------------------------------------------
# Aggregation


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(runs, targets):
    out = {}
    base_runs = runs.get(BASELINE, [])
    for t in targets:
        rs = runs[t]
        good = [r for r in rs if r]
        s = {
            "rounds": len(good),
            "rps": med([r["rps"] for r in good]),
            "p50_us": med([r["p50_us"] for r in good]),
            "p99_us": med([r["p99_us"] for r in good]),
            "cpu_us_per_req": med([r["cpu_us_per_req"] for r in good]),
            "cpu_util": med([r["cpu_util"] for r in good]),
            "rss_peak_kib": max([r["rss_peak_kib"] for r in good], default=None),
            "errors": sum(r["errors"] for r in good),
            "requests": sum(r["requests"] for r in good),
            "died": any(not r["alive_after"] for r in good) or len(good) < len(rs),
        }
        # Ratios pair by pair within each round, then the median over rounds.
        pairs = [(r, b) for r, b in zip(rs, base_runs) if r and b]

        def ratio(key):
            vals = []
            for r, b in pairs:
                if r.get(key) is not None and b.get(key):
                    vals.append(r[key] / b[key])
            return med(vals)

        s["rps_ratio"] = ratio("rps")
        s["cpu_ratio"] = ratio("cpu_us_per_req")
        s["p99_ratio"] = ratio("p99_us")
        out[t] = s
    return out


# ------------------------------------------------------------------------------------------------
# Output


def fmt_us(us):
    if us is None:
        return "—"
    if us < 1000:
        return f"{us:.0f} µs"
    if us < 1_000_000:
        return f"{us / 1000:.2f} ms"
    return f"{us / 1e6:.2f} s"


def fmt_num(x, digits=0):
    return "—" if x is None else f"{x:,.{digits}f}"


def fmt_kib(k):
    if k is None:
        return "—"
    return f"{k / 1024:.1f} MiB" if k >= 1024 else f"{k} KiB"


def fmt_ratio(x):
    return "—" if x is None else f"{x:.2f}"


def write_markdown(path, data):
    m = data["meta"]
    L = []
    L.append(f"# ringway vs nginx vs haproxy — {m['started']}")
    L.append("")
    L.append(f"- mode: {'quick' if m['quick'] else 'full'}; {m['rounds']} round(s) of {m['duration_s']} s per "
             f"target (A B C order), warm-up {m['warmup_s']} s; wrk threads {m['wrk_threads']}")
    L.append(f"- machine: {m['nproc']} CPU(s), {m['kernel']}; origin: nginx with {m['origin_workers']} workers")
    L.append(f"- versions: {m['versions']['ringway']} ({m['ringway_git']}), {m['versions']['nginx']}, "
             f"{m['versions']['haproxy']}, {m['versions']['wrk']}")
    L.append(f"- load average at start {m.get('loadavg_start')}, at end {m.get('loadavg_end')}; "
             f"elapsed {m.get('elapsed_s')} s; ringway binary: {m.get('build') or '?'}")
    L.append("- load generator, origin and proxy share the same CPUs: compare the ratios, not the absolute numbers")
    L.append("- ratios vs nginx: per round ringway/nginx (or haproxy/nginx), median over rounds. "
             "req/s: higher is better; CPU/req and p99: lower is better")
    L.append("")
    L.append("| scenario | target | req/s | p50 | p99 | CPU µs/req | peak RSS | errors "
             "| req/s ×nginx | CPU/req ×nginx | p99 ×nginx |")
    L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for sc in data["scenarios"]:
        for t, s in sc["summary"].items():
            flag = " (died)" if s["died"] else ""
            L.append(f"| {sc['name']} | {t}{flag} | {fmt_num(s['rps'])} | {fmt_us(s['p50_us'])} | "
                     f"{fmt_us(s['p99_us'])} | {fmt_num(s['cpu_us_per_req'], 1)} | {fmt_kib(s['rss_peak_kib'])} | "
                     f"{s['errors']} | {fmt_ratio(s['rps_ratio'])} | {fmt_ratio(s['cpu_ratio'])} | "
                     f"{fmt_ratio(s['p99_ratio'])} |")
    if data.get("idle"):
        idle = data["idle"]
        L.append("")
        L.append(f"## Idle keep-alive connections ({idle['connections']} per proxy, {idle['workers']} worker(s))")
        L.append("")
        L.append("| target | held | failed | RSS before | RSS after | RSS per idle conn | ×nginx |")
        L.append("|---|---:|---:|---:|---:|---:|---:|")
        for t, r in idle["results"].items():
            per = "—" if r["bytes_per_conn"] is None else f"{r['bytes_per_conn'] / 1024:.2f} KiB"
            L.append(f"| {t} | {r['held']} | {r['failed']} | {fmt_kib(r['rss_before_kib'])} | "
                     f"{fmt_kib(r['rss_after_kib'])} | {per} | {fmt_ratio(r['ratio_vs_nginx'])} |")
    if data["problems"]:
        L.append("")
        L.append("## Problems observed")
        L.append("")
        for p in data["problems"]:
            L.append("- " + p.replace("\n", "\n  "))
    L.append("")
    with open(path, "w") as f:
        f.write("\n".join(L))


def esc(s):
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def write_svg(path, data):
    """Two panels of horizontal bars: req/s ratio and CPU/request ratio vs nginx, per scenario."""
    series = [t for t in data["meta"]["targets"] if t != BASELINE]
    colors = {"ringway": "#1f77b4", "haproxy": "#ff7f0e"}
    rows = [(sc["name"], sc["summary"]) for sc in data["scenarios"]]
    if data.get("idle"):
        rows_idle = {t: r.get("ratio_vs_nginx") for t, r in data["idle"]["results"].items()}
    else:
        rows_idle = None
    bar_h, gap = 11, 10
    row_h = bar_h * len(series) + gap
    label_w, panel_w, pad = 190, 300, 40
    top = 70
    height = top + max(1, len(rows)) * row_h + 60
    width = label_w + 2 * panel_w + 3 * pad
    panels = [("rps_ratio", "req/s vs nginx (higher is better)"),
              ("cpu_ratio", "CPU per request vs nginx (lower is better)")]
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
         f'font-family="sans-serif" font-size="11">',
         f'<rect width="{width}" height="{height}" fill="white"/>',
         f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="14" font-weight="bold">'
         f'{esc("ringway and haproxy relative to nginx (median of per-round ratios)")}</text>']
    # Legend
    lx = label_w
    for t in series:
        o.append(f'<rect x="{lx}" y="28" width="12" height="12" fill="{colors.get(t, "#888")}"/>')
        o.append(f'<text x="{lx + 16}" y="38">{esc(t)}</text>')
        lx += 90
    o.append(f'<text x="{lx}" y="38" fill="#555">dashed line = nginx (1.0)</text>')
    for pi, (key, title) in enumerate(panels):
        x0 = label_w + pad + pi * (panel_w + pad)
        vals = [s[t][key] for _, s in rows for t in series if t in s and s[t][key] is not None]
        vmax = max([1.25] + [v * 1.1 for v in vals])
        scale = panel_w / vmax
        o.append(f'<text x="{x0 + panel_w / 2}" y="{top - 14}" text-anchor="middle" font-weight="bold">'
                 f'{esc(title)}</text>')
        # grid
        step = 0.25 if vmax <= 2 else (0.5 if vmax <= 4 else 1.0)
        k = 0
        while k * step <= vmax + 1e-9 and k < 100:
            v = k * step
            x = x0 + v * scale
            o.append(f'<line x1="{x:.1f}" y1="{top - 6}" x2="{x:.1f}" y2="{top + len(rows) * row_h}" '
                     f'stroke="#eee"/>')
            o.append(f'<text x="{x:.1f}" y="{top + len(rows) * row_h + 14}" text-anchor="middle" '
                     f'fill="#555">{v:g}</text>')
            k += 1
        for ri, (name, s) in enumerate(rows):
            y = top + ri * row_h
            if pi == 0:
                o.append(f'<text x="{label_w + pad - 6}" y="{y + row_h / 2}" text-anchor="end">{esc(name)}</text>')
            for si, t in enumerate(series):
                v = s.get(t, {}).get(key)
                yy = y + si * bar_h
                if v is None:
                    o.append(f'<text x="{x0 + 3}" y="{yy + bar_h - 2}" fill="#999">n/a</text>')
                    continue
                w = max(1.0, v * scale)
                o.append(f'<rect x="{x0}" y="{yy}" width="{w:.1f}" height="{bar_h - 1}" '
                         f'fill="{colors.get(t, "#888")}"><title>{esc(t)} {esc(name)}: {v:.3f}</title></rect>')
                o.append(f'<text x="{x0 + w + 3:.1f}" y="{yy + bar_h - 2}" font-size="9">{v:.2f}</text>')
        x1 = x0 + scale
        o.append(f'<line x1="{x1:.1f}" y1="{top - 6}" x2="{x1:.1f}" y2="{top + len(rows) * row_h}" '
                 f'stroke="#333" stroke-dasharray="4,3"/>')
    if rows_idle:
        txt = "idle RSS per connection vs nginx: " + ", ".join(
            f"{t} {fmt_ratio(v)}" for t, v in rows_idle.items() if t != BASELINE)
        o.append(f'<text x="{label_w + pad}" y="{height - 14}" fill="#333">{esc(txt)}</text>')
    o.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(o) + "\n")


def version_of(argv):
    try:
        r = subprocess.run(argv, capture_output=True, timeout=10)
        txt = (r.stdout + r.stderr).decode("utf-8", "replace").strip().splitlines()
        return txt[0].strip() if txt else "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except (OSError, ValueError):
        return None


def git_rev():
    try:
        r = subprocess.run(["git", "-C", REPO, "describe", "--always", "--dirty"], capture_output=True, timeout=10)
        return r.stdout.decode().strip() or "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


# ------------------------------------------------------------------------------------------------


def parse_args():
    nproc = os.cpu_count() or 1
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="1 round of 2 s, two scenarios, a small idle test (under a minute)")
    p.add_argument("--rounds", type=int, help="rounds per scenario (default 3; quick 1)")
    p.add_argument("--duration", type=int, help="seconds per wrk run (default 10; quick 2)")
    p.add_argument("--warmup", type=int, help="warm-up seconds per target before the rounds (default 2; quick 1; 0 = none)")
    p.add_argument("--pause", type=float, default=0.3, help="seconds between two runs")
    p.add_argument("--bodies", help="comma list of 64B,4KiB,64KiB,1MiB")
    p.add_argument("--conns", help="comma list of connection counts (default 64,1024)")
    p.add_argument("--workers", help=f"comma list of proxy worker counts (default 1,{nproc})")
    p.add_argument("--modes", help="comma list of keepalive,close")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma list (nginx is the baseline)")
    p.add_argument("--idle-conns", type=int, help="idle connections per proxy (default 10000; quick 1000; 0 = skip)")
    p.add_argument("--idle-timeout", type=float, default=120.0, help="limit for opening the idle connections")
    p.add_argument("--idle-batch", type=int, default=256,
                   help="idle connections opened (and their request in flight) at a time; 1 measures "
                        "what an idle connection holds without the pools a burst of concurrent "
                        "requests leaves warm")
    p.add_argument("--idle-settle", type=float, default=1.0, help="seconds to wait before measuring idle RSS")
    p.add_argument("--wrk-threads", type=int, default=2)
    p.add_argument("--wrk-timeout", type=int, default=10, help="wrk --timeout seconds")
    p.add_argument("--origin-workers", type=int, default=nproc)
    p.add_argument("--proxy-cpus", default="",
                   help="CPU list (taskset -c) for the proxy under test, e.g. 0-7 (default: not pinned)")
    p.add_argument("--load-cpus", default="",
                   help="CPU list for the origin and wrk, e.g. 8-15 (default: not pinned)")
    p.add_argument("--ringway", default=os.path.join(REPO, "target", "release", "ringway"))
    p.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx")
    p.add_argument("--haproxy", default=shutil.which("haproxy") or "/usr/sbin/haproxy")
    p.add_argument("--wrk", default=shutil.which("wrk") or "/usr/bin/wrk")
    p.add_argument("--workdir", required=True, help="scratch directory (created by run.sh)")
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    p.add_argument("--build-note", default="", help="how ringway was built (from run.sh)")
    a = p.parse_args()
    a.nproc = nproc
    q = a.quick
    a.rounds = a.rounds or (1 if q else 3)
    a.duration = a.duration or (2 if q else 10)
    a.warmup = a.warmup if a.warmup is not None else (1 if q else 2)
    a.idle_conns = a.idle_conns if a.idle_conns is not None else (1000 if q else 10000)

    def lst(s, default):
        return [x.strip() for x in s.split(",") if x.strip()] if s else default

    a.bodies = lst(a.bodies, ["4KiB"] if q else list(BODIES))
    a.conns = [int(x) for x in lst(a.conns, ["64"] if q else ["64", "1024"])]
    a.workers = sorted({int(x) for x in lst(a.workers, [str(nproc)] if q else ["1", str(nproc)])})
    a.modes = lst(a.modes, ["keepalive", "close"])
    a.targets = lst(a.targets, TARGETS)
    for b in a.bodies:
        if b not in BODIES:
            p.error(f"unknown body {b!r}; choose from {', '.join(BODIES)}")
    for m in a.modes:
        if m not in ("keepalive", "close"):
            p.error(f"unknown mode {m!r}")
    for t in a.targets:
        if t not in TARGETS:
            p.error(f"unknown target {t!r}")
    if BASELINE not in a.targets:
        p.error("nginx (the baseline) must be among the targets")
    if not (1 <= a.rounds <= 50 and 1 <= a.duration <= 600):
        p.error("rounds must be 1..50 and duration 1..600 s")
    return a


def _on_term(signum, frame):
    raise KeyboardInterrupt


def main():
    a = parse_args()
    signal.signal(signal.SIGTERM, _on_term)
    for tool in (a.ringway, a.nginx, a.haproxy, a.wrk):
        if not os.access(tool, os.X_OK):
            raise SystemExit(f"missing executable: {tool}")
    for name, port in PORTS.items():
        if port_open(port):
            raise SystemExit(f"port {HOST}:{port} (for {name}) is already in use; stop whatever listens there")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    outdir = os.path.join(a.results, stamp)
    os.makedirs(outdir, exist_ok=True)

    scenarios = []
    for w in a.workers:
        for body in a.bodies:
            for c in a.conns:
                for mode in a.modes:
                    scenarios.append({"name": f"{body} c{c} w{w} {'ka' if mode == 'keepalive' else 'close'}",
                                      "body": body, "conns": c, "workers": w, "mode": mode})
    est = len(scenarios) * (len(a.targets) * (a.warmup + a.rounds * (a.duration + a.pause)) + 2)
    log(f"{len(scenarios)} scenario(s) x {len(a.targets)} targets x {a.rounds} round(s) of {a.duration}s; "
        f"about {est / 60:.1f} min plus the idle test; results in {outdir}")

    b = Bench(a)
    data = {
        "meta": {
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "quick": a.quick, "rounds": a.rounds, "duration_s": a.duration, "warmup_s": a.warmup,
            "wrk_threads": a.wrk_threads, "wrk_timeout_s": a.wrk_timeout, "nproc": a.nproc,
            "origin_workers": a.origin_workers, "targets": a.targets, "ports": PORTS,
            "proxy_cpus": a.proxy_cpus, "load_cpus": a.load_cpus,
            "kernel": platform.platform(), "nofile": b.nofile, "build": a.build_note,
            "ringway_git": git_rev(),
            "versions": {
                "ringway": version_of([a.ringway, "--version"]),
                "nginx": version_of([a.nginx, "-v"]),
                "haproxy": version_of([a.haproxy, "-v"]),
                "wrk": version_of([a.wrk, "--version"]).split(" Copyright")[0],
            },
        },
        "scenarios": [], "idle": None, "problems": b.problems,
    }
    data["meta"]["loadavg_start"] = loadavg()
    if data["meta"]["loadavg_start"] and data["meta"]["loadavg_start"][0] > 0.5:
        log(f"note: load average {data['meta']['loadavg_start'][0]:.2f} at the start: something else is busy; "
            "it competes with every target alike but adds noise")
    t_start = time.monotonic()
    try:
        b.make_files()
        b.start_origin()
        for sc in scenarios:
            data["scenarios"].append(b.run_scenario(sc))
        if a.idle_conns > 0:
            data["idle"] = b.idle_test(max(a.workers), a.idle_conns)
    except KeyboardInterrupt:
        b.problem("interrupted; results are partial")
    finally:
        b.procs.stop_all()
        data["meta"]["elapsed_s"] = round(time.monotonic() - t_start, 1)
        data["meta"]["loadavg_end"] = loadavg()
        logs = os.path.join(outdir, "logs")
        os.makedirs(logs, exist_ok=True)
        for name in ["origin"] + a.targets:
            for src in (os.path.join(a.workdir, f"{name}.log"), os.path.join(a.workdir, name, "error.log")):
                if os.path.exists(src) and os.path.getsize(src) > 0:
                    dst = os.path.join(logs, name + ("-error.log" if src.endswith("error.log") else ".log"))
                    shutil.copy(src, dst)
        with open(os.path.join(outdir, "results.json"), "w") as f:
            json.dump(data, f, indent=1)
        write_markdown(os.path.join(outdir, "results.md"), data)
        write_svg(os.path.join(outdir, "ratios.svg"), data)
    log(f"done in {data['meta']['elapsed_s']} s: {outdir}/results.md, results.json, ratios.svg")
    with open(os.path.join(outdir, "results.md")) as f:
        print(f.read())
    return 1 if b.problems else 0


if __name__ == "__main__":
    sys.exit(main())
