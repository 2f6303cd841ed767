#!/usr/bin/env bash
# What idle keep-alive connections cost when nothing happens: N client connections each send one
# request through the proxy and then sit idle; the proxy's CPU (user + system, from /proc) is
# read over SECS seconds with no traffic. ringway binaries and an nginx proxy (one worker each)
# in front of the same nginx origin, in turn, ROUNDS times. An idle connection should cost
# nothing per second: a cost that grows with N is a per-connection timer or wake-up.
#
#   bash perf/idle.sh [n=10000] [secs=20] [rounds=2] [BIN ...]   # default BIN: target/release/ringway
#
# Needs nginx and python3. Load only ever goes to 127.0.0.1 (ports 18700-18781).
set -euo pipefail
N=${1:-10000}; SECS=${2:-20}; ROUNDS=${3:-2}; shift $(( $# < 3 ? $# : 3 ))
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BINS=("$@"); [[ ${#BINS[@]} -gt 0 ]] || BINS=("${CARGO_TARGET_DIR:-$ROOT/target}/release/ringway")
for t in nginx python3 curl; do command -v $t >/dev/null || { echo "needs $t"; exit 2; }; done
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
(( $(ulimit -n) > N + 100 )) || { echo "open-file limit $(ulimit -n) is too low for $N connections"; exit 2; }
D=$(mktemp -d /tmp/ringway-idle.XXXXXX); chmod 755 "$D"
. "$ROOT/perf/lib.sh"
P=""
cleanup() { [[ -n $P ]] && kill "$P" 2>/dev/null || true; ng_stop; rm -rf "$D"; }
trap cleanup EXIT
mkdir -p "$D/www"; head -c 64 /dev/zero | tr '\0' a > "$D/www/b64"; chmod -R a+rX "$D/www"
{ ng_head origin 1; echo "  server { listen 127.0.0.1:18700 backlog=4096; root $D/www; location / { } } }"; } > "$D/origin.conf"
{ ng_head proxy 1; ng_upstream 18700
  echo "  server { listen 127.0.0.1:18781 backlog=4096; keepalive_timeout 600s; location / { $NG_PASS } } }"; } > "$D/proxy.conf"
{ rw_head 18780 18700; printf '[timeouts]\nclient_idle = "600s"\n[[routes]]\npath_prefix = "/"\nupstream = "origin"\n'; } > "$D/ringway.toml"
ng_start origin
cat > "$D/idle.py" <<'PY'
import os, socket, sys, time
pid, port, n, secs = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
def cpu():
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
conns = []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /b64 HTTP/1.1\r\nHost: a\r\n\r\n")
    conns.append(s)
for s in conns:
    s.settimeout(10)
    d = b""
    while b"\r\n\r\n" not in d:
        d += s.recv(4096)
time.sleep(2)  # let the last answers' work settle
c0, t0 = cpu(), time.time()
time.sleep(secs)
c1, t1 = cpu(), time.time()
print(f"{1000 * (c1 - c0) / (t1 - t0):.2f}")
PY
for r in $(seq "$ROUNDS"); do
  for b in "${BINS[@]}" nginx; do
    if [[ $b == nginx ]]; then
      ng_start proxy; wait_200 http://127.0.0.1:18781/b64
      pid=$(pgrep -P "$(cat "$D/proxy.pid")" | head -1); port=18781
    else
      RINGWAY_LOG=warn "$b" -c "$D/ringway.toml" 2>> "$D/ringway.log" & P=$!
      wait_200 http://127.0.0.1:18780/b64; pid=$P; port=18780
    fi
    ms=$(python3 "$D/idle.py" "$pid" $port "$N" "$SECS")
    printf 'round %s %-28s %6s idle connections: %6s ms CPU per second\n' "$r" "$(basename "$b")" "$N" "$ms"
    if [[ $b == nginx ]]; then kill "$(cat "$D/proxy.pid")"; while [[ -f $D/proxy.pid ]]; do sleep 0.1; done
    else kill "$P"; wait "$P" 2>/dev/null || true; P=""; fi
  done
done
