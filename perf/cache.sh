#!/usr/bin/env bash
# The response cache (issue 12), end to end: ringway and nginx side by side, one worker each, in
# front of the same nginx origin (1 KiB answers with `Cache-Control: max-age=3600`).
#   hit   - GET /hit again and again: ringway's cache vs nginx `proxy_cache` on a memory-backed
#           (tmpfs) cache directory. req/s, CPU per request (the proxy process(es) only), p50
#           and p99 latency.
#   miss  - a new URL per request (/m/1, /m/2, ...): ringway with the cache (every request a
#           miss that is stored, the 64 MiB budget full and evicting) vs the same route
#           without a cache, CPU per request (user and system apart: the cache's work is in
#           user space, the sockets' in the kernel is the same for both). The two run back to
#           back in each round, in turn first; the added CPU is the median of the rounds' ratios.
#   memory - RSS growth of ringway per object, storing 20,000 distinct 1 KiB objects (well
#           within the budget) before the rounds.
# Rounds alternate the targets; medians are printed at the end.
#
#   cargo build --release && bash perf/cache.sh [rounds=3] [seconds=5] [conns=32]
# RINGWAY_BIN=path/to/ringway runs another build (default: target/release/ringway). BUDGET (64MiB)
# sets the store's budget: one that fits a core's L2 shows what writing into memory long out of
# cache costs a stored miss.
# PIN=1 pins the proxy under test (ringway, or nginx with proxy_cache) to CPU 1 and the origin and
# wrk to CPU 0 (needs 2 CPUs): the proxy's CPU time per request then moves less with what the
# load generator does on the same core. Pinned, req/s is bound by wrk's core: compare CPU per
# request then, not req/s.
# Needs nginx and wrk (apt-get install -y nginx-light wrk). Load only ever goes to 127.0.0.1.
set -euo pipefail
ROUNDS=${1:-3}; SECS=${2:-5}; CONNS=${3:-32}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${RINGWAY_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/ringway}
D=$(mktemp -d /tmp/ringway-cache-perf.XXXXXX)
SHM=$(mktemp -d /dev/shm/ringway-cache-perf.XXXXXX)
# nginx workers run as an unprivileged user when started as root.
chmod 777 "$SHM"; chmod 755 "$D"
ORIGIN=18300; GW=18380; NG=18390
GWPID=""
. "$ROOT/perf/lib.sh"
cleanup() {
  if [[ -n $GWPID ]]; then kill "$GWPID" 2>/dev/null || true; wait "$GWPID" 2>/dev/null || true; fi
  ng_stop
  [[ -n ${KEEP:-} ]] && { echo "kept $D"; return; }
  rm -rf "$D" "$SHM"
}
trap cleanup EXIT
command -v nginx >/dev/null && command -v wrk >/dev/null || { echo "needs nginx and wrk"; exit 2; }
[[ -x $BIN ]] || { echo "no $BIN: cargo build --release first"; exit 2; }

PROXY_CPU=(); LOAD_CPU=()
if [[ -n ${PIN:-} ]]; then
  (( $(nproc) >= 2 )) || { echo "PIN=1 needs 2 CPUs"; exit 2; }
  PROXY_CPU=(taskset -c 1); LOAD_CPU=(taskset -c 0)
fi

cache_configs $ORIGIN $GW "${BUDGET:-64MiB}"
"${LOAD_CPU[@]}" nginx -p "$D" -c "$D/origin.conf" -e "$D/origin.err"

RINGWAY_LOG=warn "${PROXY_CPU[@]}" "$BIN" -c "$D/ringway.toml" 2> "$D/ringway.log" &
GWPID=$!

{ ng_head nginx 1; ng_upstream $ORIGIN 64
  echo "  proxy_cache_path $SHM/ng levels=1:2 keys_zone=c:64m max_size=512m inactive=60m use_temp_path=off;
  server { listen 127.0.0.1:$NG backlog=4096;
    location / { $NG_PASS proxy_cache c; proxy_cache_lock on; add_header X-Cache \$upstream_cache_status; } } }"
} > "$D/nginx.conf"
# (as ng_start does, pinned where asked)
"${PROXY_CPU[@]}" nginx -p "$D" -c "$D/nginx.conf" -e "$D/nginx.err"

wait_200 "http://127.0.0.1:$GW/hit" "http://127.0.0.1:$NG/hit" "http://127.0.0.1:$GW/plain/x"
echo "ringway second GET: $(curl -s -D - -o /dev/null "http://127.0.0.1:$GW/hit" | grep -i '^cache-status' | tr -d '\r')"
echo "nginx second GET:   $(curl -s -D - -o /dev/null "http://127.0.0.1:$NG/hit" | grep -i '^x-cache' | tr -d '\r')"

# A new path per request, from a counter of its own per wrk thread.
unique_lua "$D/unique.lua"

HZ=$(getconf CLK_TCK)
# "user system" clock ticks of the processes given.
ticks_of() {
  local u=0 y=0 p t
  for p in "$@"; do
    t=$(awk '{print $14, $15}' "/proc/$p/stat" 2>/dev/null) || t="0 0"
    u=$((u + ${t% *})); y=$((y + ${t#* }))
  done
  echo "$u $y"
}
# nginx's worker and cache manager (not the cache loader, which nginx starts a minute in and
# which exits once it has read the cache: a process that comes and goes within a run).
ng_pids() { pgrep -P "$(cat "$D/nginx.pid")" -f 'worker process|cache manager' | tr '\n' ' '; }
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
# Prints "req/s µs-CPU/req p50-ms p99-ms requests µs-user/req µs-system/req" for one run; $1 url,
# $2.. pids to account.
run() {
  local url=$1; shift
  local t0 t1 out
  t0=$(ticks_of "$@")
  out=$("${LOAD_CPU[@]}" wrk -t1 -c"$CONNS" -d"${SECS}s" --latency ${LUA:+-s "$LUA"} "$url")
  t1=$(ticks_of "$@")
  python3 - $t0 $t1 "$HZ" "$SECS" <<PY
import re, sys
out = """$out"""
u0, s0, u1, s1, hz, secs = map(float, sys.argv[1:])
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
reqs = int(re.search(r"(\d+) requests in", out).group(1))
def ms(label):
    m = re.search(label + r"\s+([\d.]+)(us|ms|s)", out)
    v = float(m.group(1)); return v / 1000 if m.group(2) == "us" else v * 1000 if m.group(2) == "s" else v
if "Non-2xx" in out: print("ERR non-2xx", file=sys.stderr)
per = lambda t: round(t / hz * 1e6 / max(reqs, 1), 2)
print(rps, per(u1 + s1 - u0 - s0), ms("50%"), ms("99%"), reqs, per(u1 - u0), per(s1 - s0))
PY
}
# Memory per object: 20,000 distinct objects on keep-alive connections.
rss0=$(rss_kib "$GWPID")
python3 - "$GW" <<'PY'
import http.client, sys
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]))
for i in range(20000):
    c.request("GET", f"/fill/{i}")
    r = c.getresponse(); r.read()
    assert r.status == 200
PY
rss1=$(rss_kib "$GWPID")
echo "memory: RSS +$((rss1 - rss0)) KiB for 20000 stored objects: $(( (rss1 - rss0) * 1024 / 20000 )) bytes per 1 KiB object"
# Warm-up.
"${LOAD_CPU[@]}" wrk -t1 -c"$CONNS" -d1s "http://127.0.0.1:$GW/hit" >/dev/null
"${LOAD_CPU[@]}" wrk -t1 -c"$CONNS" -d1s "http://127.0.0.1:$NG/hit" >/dev/null
: > "$D/results"
for r in $(seq "$ROUNDS"); do
  g=$(LUA="" run "http://127.0.0.1:$GW/hit" "$GWPID")
  n=$(LUA="" run "http://127.0.0.1:$NG/hit" $(ng_pids))
  echo "round $r hit:  ringway $g | nginx $n   (req/s µs-CPU/req p50-ms p99-ms requests µs-user µs-sys)"
  echo "hit $g $n" >> "$D/results"
  # The stored miss and the route without a cache run back to back, in turn first, so that a
  # drift of the machine's speed within a round does not always favour the same one.
  if (( r % 2 )); then
    m=$(LUA="$D/unique.lua" PREFIX=/m/ ROUND=$r run "http://127.0.0.1:$GW" "$GWPID")
    p=$(LUA="$D/unique.lua" PREFIX=/plain/ ROUND=$r run "http://127.0.0.1:$GW" "$GWPID")
  else
    p=$(LUA="$D/unique.lua" PREFIX=/plain/ ROUND=$r run "http://127.0.0.1:$GW" "$GWPID")
    m=$(LUA="$D/unique.lua" PREFIX=/m/ ROUND=$r run "http://127.0.0.1:$GW" "$GWPID")
  fi
  u=$(LUA="$D/unique.lua" PREFIX=/ns/ ROUND=$r run "http://127.0.0.1:$GW" "$GWPID")
  echo "round $r miss: cached route $m | same route without cache $p | cached route, no-store answers $u"
  echo "miss $m $p $u" >> "$D/results"
done
python3 - "$D/results" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
hit = [list(map(float, r[1:])) for r in rows if r[0] == "hit"]
miss = [list(map(float, r[1:])) for r in rows if r[0] == "miss"]
med = lambda rs, i: statistics.median(r[i] for r in rs)
# Each run gives 7 numbers (see run): nginx's hit run and the miss runs follow at 7 and 14.
N, P, U = 0, 7, 14
print("\n| hit | req/s | µs CPU/req | p50 ms | p99 ms |")
print("|---|---|---|---|---|")
print(f"| ringway cache | {med(hit,0):,.0f} | {med(hit,1)} | {med(hit,2)} | {med(hit,3)} |")
print(f"| nginx proxy_cache (tmpfs) | {med(hit,7):,.0f} | {med(hit,8)} | {med(hit,9)} | {med(hit,10)} |")
print(f"| ringway / nginx | {med(hit,0)/med(hit,7):.2f}x | {med(hit,1)/med(hit,8):.2f}x | | |")
print("\n| miss (new URL per request) | req/s | µs CPU/req | µs user | µs system |")
print("|---|---|---|---|---|")
for name, o in (("cached route (each a stored miss)", N), ("same route, no cache", P),
                ("cached route, origin says no-store (nothing stored)", U)):
    print(f"| {name} | {med(miss,o):,.0f} | {med(miss,o+1):.2f} | {med(miss,o+5):.2f} | {med(miss,o+6):.2f} |")
# Per round: the two runs of a round ran back to back, so their ratio carries less of the
# machine's drift than a ratio of medians.
added = sorted((r[N+1] / r[P+1] - 1) * 100 for r in miss)
unst = sorted((r[U+1] / r[P+1] - 1) * 100 for r in miss)
print(f"| CPU added by the cache on a stored miss | {statistics.median(added):+.1f}% "
      f"(rounds: {', '.join(f'{a:+.1f}' for a in added)}) | | | |")
print(f"| CPU added by the cache on an unstored miss | {statistics.median(unst):+.1f}% | | | |")
# The cache's work is user-space work (a stored miss makes the same system calls as the route
# without a cache): the user time it adds, over the route's whole CPU, per round. Steadier than
# the ratio above, which carries the system time's swings between runs.
uadd = sorted((r[N+5] - r[P+5]) / r[P+1] * 100 for r in miss)
print(f"| user time added by a stored miss, over the route's CPU | {statistics.median(uadd):+.1f}% "
      f"(rounds: {', '.join(f'{a:+.1f}' for a in uadd)}) | | | |")
share = med(miss, P+5) / med(miss, P+1)
print(f"| user-space share of the route's CPU without a cache | {share*100:.0f}% | | | |")
PY
