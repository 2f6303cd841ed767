#!/usr/bin/env bash
# API composition (issue 13), end to end: one ringway worker with two routes in front of the
# same nginx origin, measured side by side with wrk:
#   plain    - /plain proxied to the origin's /a (one ~1 KiB JSON answer);
#   composed - /composed: three parallel calls (/a, /b, /c, ~1 KiB JSON each) merged into one.
# Printed per round and as medians: req/s, ringway's CPU time per client request (from
# /proc/<pid>/stat, steadier than req/s on a shared machine), p50 and p99 latency, and the
# composed route's CPU and p99 over the plain route's (the p99 a composed request adds over one
# proxied call, the calls being parallel).
#
#   cargo build --release && bash perf/compose.sh [rounds=3] [seconds=5] [conns=16]
# RINGWAY_BIN=path/to/ringway runs another build (default: target/release/ringway, or
# $CARGO_TARGET_DIR/release/ringway). Needs nginx and wrk (apt-get install -y nginx-light wrk).
# Load only ever goes to 127.0.0.1.
set -euo pipefail
ROUNDS=${1:-3}; SECS=${2:-5}; CONNS=${3:-16}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${RINGWAY_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/ringway}
D=$(mktemp -d /tmp/ringway-compose-perf.XXXXXX)
ORIGIN=18300; GW=18380
PIDS=()
. "$ROOT/perf/lib.sh"
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  ng_stop
  rm -rf "$D"
}
trap cleanup EXIT
command -v nginx >/dev/null && command -v wrk >/dev/null || { echo "needs nginx and wrk"; exit 2; }
[[ -x $BIN ]] || { echo "no ringway binary at $BIN (cargo build --release)"; exit 2; }

# Three ~1 KiB JSON documents with disjoint top-level keys.
mkdir -p "$D/www"
python3 - "$D/www" <<'PY'
import json, sys
for name in "abc":
    doc = {f"{name}_items": [{"id": i, "name": f"{name}-item-{i}", "tags": ["x", "y"], "price": i * 1.5}
                             for i in range(18)]}
    text = json.dumps(doc, separators=(",", ":"))
    open(f"{sys.argv[1]}/{name}", "w").write(text)
    print(f"origin /{name}: {len(text)} bytes", file=sys.stderr)
PY
{ ng_head origin 1
  echo "  server { listen 127.0.0.1:$ORIGIN backlog=4096; root $D/www; default_type application/json; } }"
} > "$D/origin.conf"
# nginx's workers run as an unprivileged user: let them read the documents.
chmod 755 "$D" "$D/www"; chmod 644 "$D"/www/*
ng_start origin

{ rw_head $GW $ORIGIN; cat <<EOF

[[routes]]
path_prefix = "/plain"
replace_prefix = "/a"
upstream = "origin"

[[routes]]
path = "/composed"
[routes.compose]
[[routes.compose.calls]]
id = "a"
upstream = "origin"
path = "/a"
[[routes.compose.calls]]
id = "b"
upstream = "origin"
path = "/b"
[[routes.compose.calls]]
id = "c"
upstream = "origin"
path = "/c"
EOF
} > "$D/ringway.toml"
RINGWAY_LOG=warn "$BIN" -c "$D/ringway.toml" 2> "$D/ringway.log" &
GWPID=$!; PIDS+=($GWPID)
for u in "http://127.0.0.1:$GW/plain" "http://127.0.0.1:$GW/composed"; do
  code=000
  for _ in $(seq 100); do
    code=$(curl -s -o /dev/null -w '%{http_code}' "$u" || true)
    [[ $code == 200 ]] && break; sleep 0.1
  done
  [[ $code == 200 ]] || { echo "$u answered $code"; cat "$D/ringway.log"; exit 1; }
  echo "$u: $(curl -s "$u" | wc -c) bytes"
done

HZ=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# wrk's latency percentiles in ms.
to_ms() { python3 -c "
import re,sys
v=sys.argv[1]; m=re.match(r'([0-9.]+)(us|ms|s)', v)
n=float(m.group(1)); print({'us': n/1000, 'ms': n, 's': n*1000}[m.group(2)])" "$1"; }
# Prints "req/s µs-CPU-per-request p50-ms p99-ms".
run() { # $1 url
  local t0 t1 out rps p50 p99
  t0=$(cpu_ticks "$GWPID")
  out=$(wrk -t1 -c"$CONNS" -d"${SECS}s" --latency "$1")
  t1=$(cpu_ticks "$GWPID")
  if grep -q "Non-2xx" <<< "$out"; then echo "non-2xx answers from $1" >&2; echo "$out" >&2; exit 1; fi
  rps=$(awk '/Requests\/sec/ {print $2}' <<< "$out")
  p50=$(to_ms "$(awk '$1 == "50%" {print $2}' <<< "$out")")
  p99=$(to_ms "$(awk '$1 == "99%" {print $2}' <<< "$out")")
  python3 -c "print($rps, round(($t1 - $t0) / $HZ * 1e6 / ($rps * $SECS), 2), $p50, $p99)"
}
wrk -t1 -c"$CONNS" -d1s "http://127.0.0.1:$GW/plain" > /dev/null
wrk -t1 -c"$CONNS" -d1s "http://127.0.0.1:$GW/composed" > /dev/null
: > "$D/results"
for r in $(seq "$ROUNDS"); do
  for route in plain composed; do
    read -r rps cpu p50 p99 <<< "$(run "http://127.0.0.1:$GW/$route")"
    echo "round $r $route: $rps req/s, $cpu µs CPU/req, p50 $p50 ms, p99 $p99 ms"
    echo "$route $rps $cpu $p50 $p99" >> "$D/results"
  done
done
python3 - "$D/results" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
med = {}
for route in ("plain", "composed"):
    r = [x for x in rows if x[0] == route]
    med[route] = [statistics.median(float(x[i]) for x in r) for i in range(1, 5)]
print()
print("| route | req/s | ringway CPU µs/req | p50 ms | p99 ms |")
print("|---|---|---|---|---|")
for route, (rps, cpu, p50, p99) in med.items():
    print(f"| {route} | {rps:.0f} | {cpu:.1f} | {p50:.3f} | {p99:.3f} |")
p, c = med["plain"], med["composed"]
print()
print(f"CPU per composed request / per proxied request: {c[1] / p[1]:.2f}x (target: at most 3x)")
print(f"p50 added by composing (composed - plain): {c[2] - p[2]:.3f} ms")
print(f"p99 added by composing (composed - plain): {c[3] - p[3]:.3f} ms (target: at most 1 ms)")
PY
