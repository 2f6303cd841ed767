#!/usr/bin/env bash
# Routing at scale (issue 15), end to end: ringway and nginx side by side, one worker each, in
# front of the same nginx origin (64-byte answers), with three route tables:
#   one   - 1 prefix route, request to it;
#   prefix - 10,000 prefix routes /svc0/ ... /svc9999/, request to /svc9999/x (the last);
#   regex  - 1,000 regex routes ^/r0/[0-9]+$ ... , request to /r999/123 (the last).
# nginx gets the same routes as locations (prefix locations; regex locations in order).
# Rounds alternate the tables; the medians and each table's ratio to its own 1-route figure
# are printed at the end, with ringway's CPU time per request (steadier than req/s on a shared
# machine).
#
#   cargo build --release && bash perf/routing.sh [rounds=3] [seconds=5] [conns=32]
# RINGWAY_BIN=path/to/ringway runs another build (default: target/release/ringway).
# Needs nginx and wrk (apt-get install -y nginx-light wrk). Load only ever goes to 127.0.0.1.
set -euo pipefail
ROUNDS=${1:-3}; SECS=${2:-5}; CONNS=${3:-32}
N_PREFIX=10000; N_REGEX=1000
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${RINGWAY_BIN:-$ROOT/target/release/ringway}
D=$(mktemp -d /tmp/ringway-routing-perf.XXXXXX)
ORIGIN=18200; GW=18280; NG=18290
PIDS=()
. "$ROOT/perf/lib.sh"
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  ng_stop
  rm -rf "$D"
}
trap cleanup EXIT
command -v nginx >/dev/null && command -v wrk >/dev/null || { echo "needs nginx and wrk"; exit 2; }

{ ng_head origin 1
  echo "  server { listen 127.0.0.1:$ORIGIN backlog=4096; location / { default_type text/plain; return 200 \"$(printf '%063d' 0)\n\"; } } }"
} > "$D/origin.conf"
ng_start origin

# Tables: the ringway config and the nginx locations, generated side by side.
python3 - "$D" "$N_PREFIX" "$N_REGEX" "$NG_PASS" <<'PY'
import sys
d, npre, nre = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
route = 'upstream = "origin"\nset_host = "origin"\n'
loc = "{ " + sys.argv[4] + " proxy_set_header Host origin; }"
tables = {
    "one": ([('path_prefix', "/one/")], ["location /one/ " + loc]),
    "prefix": ([('path_prefix', f"/svc{i}/") for i in range(npre)],
               [f"location /svc{i}/ " + loc for i in range(npre)]),
    "regex": ([('path_regex', f"^/r{i}/[0-9]+$") for i in range(nre)],
              [f"location ~ ^/r{i}/[0-9]+$ " + loc for i in range(nre)]),
}
for name, (routes, locs) in tables.items():
    with open(f"{d}/{name}.routes.toml", "w") as f:
        for k, v in routes:
            f.write(f"[[routes]]\n{k} = '{v}'\n{route}")
    with open(f"{d}/{name}.locations", "w") as f:
        f.write("\n".join(locs) + "\n")
PY
declare -A PATHS=([one]=/one/x [prefix]=/svc$((N_PREFIX - 1))/x [regex]=/r$((N_REGEX - 1))/123)
TABLES=(one prefix regex)
port=0
for t in "${TABLES[@]}"; do
  gwp=$((GW + port)); ngp=$((NG + port)); port=$((port + 1))
  { rw_head "$gwp" "$ORIGIN"; cat "$D/$t.routes.toml"; } > "$D/$t.ringway.toml"
  RINGWAY_LOG=info "$BIN" -c "$D/$t.ringway.toml" 2> "$D/$t.ringway.log" &
  PIDS+=($!); echo "$!" > "$D/$t.gwpid"
  { ng_head "ng-$t" 1; ng_upstream "$ORIGIN" 64
    echo "  server { listen 127.0.0.1:$ngp backlog=4096;"
    cat "$D/$t.locations"
    echo "  } }"
  } > "$D/ng-$t.conf"
  ng_start "ng-$t"
  echo "$gwp $ngp" > "$D/$t.ports"
done
for t in "${TABLES[@]}"; do
  read -r gwp ngp < "$D/$t.ports"
  wait_200 "http://127.0.0.1:$gwp${PATHS[$t]}" "http://127.0.0.1:$ngp${PATHS[$t]}"
  grep -h "router:" "$D/$t.ringway.log" | sed "s/^/[$t] /" || true
done
HZ=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# Prints "req/s µs-of-CPU-per-request" (CPU of the ringway process; 0 for nginx).
run() { # $1 url $2 pid-or-empty
  local t0=0 t1=0 rps
  [[ -n $2 ]] && t0=$(cpu_ticks "$2")
  rps=$(wrk -t1 -c"$CONNS" -d"${SECS}s" "$1" | awk '/Requests\/sec/ {print $2} /Non-2xx/ {print "ERR " $0 > "/dev/stderr"}')
  [[ -n $2 ]] && t1=$(cpu_ticks "$2")
  python3 -c "print($rps, round(($t1 - $t0) / $HZ * 1e6 / ($rps * $SECS), 2))"
}
for t in "${TABLES[@]}"; do
  read -r gwp ngp < "$D/$t.ports"
  wrk -t1 -c"$CONNS" -d1s "http://127.0.0.1:$gwp${PATHS[$t]}" >/dev/null
  wrk -t1 -c"$CONNS" -d1s "http://127.0.0.1:$ngp${PATHS[$t]}" >/dev/null
done
: > "$D/results"
for r in $(seq "$ROUNDS"); do
  for t in "${TABLES[@]}"; do
    read -r gwp ngp < "$D/$t.ports"
    g=$(run "http://127.0.0.1:$gwp${PATHS[$t]}" "$(cat "$D/$t.gwpid")")
    n=$(run "http://127.0.0.1:$ngp${PATHS[$t]}" "")
    echo "round $r $t: ringway ${g% *} req/s (${g#* } µs CPU/req), nginx ${n% *} req/s"
    echo "$t ${g% *} ${g#* } ${n% *}" >> "$D/results"
  done
done
python3 - "$D/results" "$N_PREFIX" "$N_REGEX" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
med = {}
for t in ("one", "prefix", "regex"):
    r = [x for x in rows if x[0] == t]
    med[t] = tuple(statistics.median(float(x[i]) for x in r) for i in (1, 2, 3))
label = {"one": "1 route", "prefix": f"{sys.argv[2]} prefix routes, last", "regex": f"{sys.argv[3]} regex routes, last"}
print("\n| table | ringway req/s | × its 1-route | µs CPU/req | nginx req/s | × its 1-route | ringway / nginx |")
print("|---|---|---|---|---|---|---|")
for t in ("one", "prefix", "regex"):
    g, c, n = med[t]
    print(f"| {label[t]} | {g:,.0f} | {g / med['one'][0]:.2f} | {c} | {n:,.0f} | {n / med['one'][2]:.2f} | {g / n:.2f} |")
PY
