#!/usr/bin/env bash
# The issue-12 miss measure as a paired A/B: CPU per request of a stored miss (cached route, a
# new URL per request, the budget full so that each store evicts) against the same route without
# a cache, under wrk load (one worker, 1 KiB answers from an nginx origin).
#
# What perf/cache.sh cannot give: its rounds are seconds apart and 3-5 per run, and the kernel
# here splits user and system time by sampling at each tick (CONFIG_TICK_CPU_ACCOUNTING: ~250
# samples a second), so the user-time estimate carries a few percent of sampling noise per round.
# Here the two run in short alternating segments (order A B, B A, ...), the CPU is the process's
# own scheduler clock (/proc/PID/task/*/schedstat, nanoseconds: exact, not sampled), and the
# added CPU is summarised over many pairs: median with a bootstrap 90% interval, and the
# pooled ratio (all segments of A over all of B). The user/system split (tick-sampled) is pooled
# over every segment, where its sampling noise is small.
#
#   cargo build --release && bash perf/cache-ab.sh [pairs=20] [seconds=1] [conns=32]
# RINGWAY_BIN=path/to/ringway (default target/release/ringway); BUDGET (64MiB); PIN=0 to not pin
# (default with 2+ CPUs: ringway on CPU 1, wrk and the origin on CPU 0); NOSTORE=1 also runs the
# cached route with no-store answers (a miss that stores nothing) as a third arm.
# RINGWAY_BIN_B=path/to/other/ringway also runs a second build side by side (its own process,
# pinned the same, on the next port), each arm on both: the two builds compared in the same
# run, segment by segment. BUDGET_B gives the second its own store budget (the same build twice
# with BUDGET_B=1MiB: what a store out of cache costs against one that fits a core's L2).
# Needs nginx and wrk. Load only ever goes to 127.0.0.1.
set -euo pipefail
PAIRS=${1:-20}; SECS=${2:-1}; CONNS=${3:-32}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${RINGWAY_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/ringway}
ORIGIN=${ORIGIN_PORT:-18500}; GW=${GW_PORT:-18580}
command -v nginx >/dev/null && command -v wrk >/dev/null || { echo "needs nginx and wrk"; exit 2; }
[[ -x $BIN ]] || { echo "no $BIN: cargo build --release first"; exit 2; }
D=$(mktemp -d /tmp/ringway-cache-ab.XXXXXX)
chmod 755 "$D"
GWPID=""; GWPID_B=""
. "$ROOT/perf/lib.sh"
cleanup() {
  local p
  for p in $GWPID $GWPID_B; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  ng_stop
  [[ -n ${KEEP:-} ]] && { echo "kept $D"; return; }
  rm -rf "$D"
}
trap cleanup EXIT

PROXY_CPU=(); LOAD_CPU=()
if [[ ${PIN:-1} != 0 ]] && (( $(nproc) >= 2 )); then
  PROXY_CPU=(taskset -c 1); LOAD_CPU=(taskset -c 0)
fi
cache_configs "$ORIGIN" "$GW" "${BUDGET:-64MiB}"
"${LOAD_CPU[@]}" nginx -p "$D" -c "$D/origin.conf" -e "$D/origin.err"
RINGWAY_LOG=warn "${PROXY_CPU[@]}" "$BIN" -c "$D/ringway.toml" 2> "$D/ringway.log" &
GWPID=$!
wait_200 "http://127.0.0.1:$GW/plain/up" "http://127.0.0.1:$GW/up"
if [[ -n ${RINGWAY_BIN_B:-} ]]; then
  [[ -x $RINGWAY_BIN_B ]] || { echo "no $RINGWAY_BIN_B"; exit 2; }
  sed "s/127.0.0.1:$GW\"/127.0.0.1:$((GW + 1))\"/" "$D/ringway.toml" > "$D/ringway-b.toml"
  if [[ -n ${BUDGET_B:-} ]]; then
    sed -i "s/^max_bytes_per_worker = .*/max_bytes_per_worker = \"$BUDGET_B\"/" "$D/ringway-b.toml"
  fi
  RINGWAY_LOG=warn "${PROXY_CPU[@]}" "$RINGWAY_BIN_B" -c "$D/ringway-b.toml" 2> "$D/ringway-b.log" &
  GWPID_B=$!
  wait_200 "http://127.0.0.1:$((GW + 1))/plain/up" "http://127.0.0.1:$((GW + 1))/up"
fi

unique_lua "$D/unique.lua"
HZ=$(getconf CLK_TCK)
# "nanoseconds-on-CPU user-ticks system-ticks" of gateway process $1 (all its threads).
cpu_of() {
  local ns=0 t
  for t in /proc/"$1"/task/*/schedstat; do
    ns=$((ns + $(cut -d' ' -f1 "$t" 2>/dev/null || echo 0)))
  done
  echo "$ns $(awk '{print $14, $15}' "/proc/$1/stat")"
}
seq_no=0
# segment ARM PREFIX [B]: one wrk run of SECS on new URLs under PREFIX (on the second build
# when B is given); appends "ARM requests ns user-ticks system-ticks" to $D/segments.
segment() {
  local arm=$1 prefix=$2 pid=$GWPID port=$GW a b out reqs
  if [[ -n ${3:-} ]]; then arm="$arm-B"; pid=$GWPID_B; port=$((GW + 1)); fi
  seq_no=$((seq_no + 1))
  a=$(cpu_of "$pid")
  out=$(PREFIX="$prefix$seq_no-" "${LOAD_CPU[@]}" wrk -t1 -c"$CONNS" -d"${SECS}s" -s "$D/unique.lua" "http://127.0.0.1:$port")
  b=$(cpu_of "$pid")
  grep -q "Non-2xx" <<<"$out" && { echo "non-2xx answers in $arm"; exit 1; }
  reqs=$(sed -n 's/^ *\([0-9]*\) requests in.*/\1/p' <<<"$out")
  read -r n0 u0 s0 <<<"$a"; read -r n1 u1 s1 <<<"$b"
  echo "$arm $reqs $((n1 - n0)) $((u1 - u0)) $((s1 - s0))" >> "$D/segments"
}
# Minor page faults of process $1 so far.
faults_of() { awk '{print $10}' "/proc/$1/stat"; }
# Fill the store past its budget (each later store evicts) and warm both routes. At 32
# connections whatever CONNS is (one connection may not fill 64 MiB in seconds on a loaded
# host), and until the store is full: a probe of stored misses that takes (almost) no page
# faults, since each store then reuses what its eviction freed. Until then a stored miss also
# pays for new memory (a page fault every other request, and the allocator's mprotect calls),
# which is not what a full store costs.
PORTS=("$GW"); [[ -n $GWPID_B ]] && PORTS+=($((GW + 1)))
PIDS=("$GWPID"); [[ -n $GWPID_B ]] && PIDS+=("$GWPID_B")
for k in "${!PORTS[@]}"; do
  port=${PORTS[k]}; pid=${PIDS[k]}; full=""
  for round in $(seq 10); do
    PREFIX=/fill$round/ "${LOAD_CPU[@]}" wrk -t1 -c32 -d4s -s "$D/unique.lua" "http://127.0.0.1:$port" >/dev/null
    f0=$(faults_of "$pid")
    out=$(PREFIX=/probe$round/ "${LOAD_CPU[@]}" wrk -t1 -c32 -d1s -s "$D/unique.lua" "http://127.0.0.1:$port")
    f1=$(faults_of "$pid")
    reqs=$(sed -n 's/^ *\([0-9]*\) requests in.*/\1/p' <<<"$out")
    # Under one fault per 100 stored misses.
    if (( (f1 - f0) * 100 < reqs )); then full=1; echo "store on port $port full after $round fill rounds ($((f1 - f0)) page faults in $reqs stored misses)"; break; fi
  done
  [[ -n $full ]] || { echo "the store on port $port did not fill (page faults go on)"; exit 1; }
  PREFIX=/plain/warm "${LOAD_CPU[@]}" wrk -t1 -c"$CONNS" -d1s -s "$D/unique.lua" "http://127.0.0.1:$port" >/dev/null
done
: > "$D/segments"
for i in $(seq "$PAIRS"); do
  arms=("stored /m/" "plain /plain/")
  [[ -n ${NOSTORE:-} ]] && arms+=("nostore /ns/")
  if [[ -n $GWPID_B ]]; then
    n=${#arms[@]}
    for ((j = 0; j < n; j++)); do arms+=("${arms[j]} B"); done
  fi
  # Rotated by one each pair: every arm runs first in turn.
  r=$(( (i - 1) % ${#arms[@]} ))
  arms=("${arms[@]:r}" "${arms[@]:0:r}")
  for a in "${arms[@]}"; do segment $a; done
done
python3 - "$D/segments" "$HZ" "$PAIRS" <<'PY'
import random, statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
hz, pairs = float(sys.argv[2]), int(sys.argv[3])
arms = {}
for arm, reqs, ns, u, s in rows:
    arms.setdefault(arm, []).append((int(reqs), int(ns), int(u), int(s)))
def per(seg): return seg[1] / 1000 / seg[0]  # µs of CPU per request
print(f"{pairs} pairs of {len(rows)//pairs} segments; CPU from schedstat (exact), user/system split from ticks (sampled)")
print("| arm | req/s (median) | µs CPU/req (median) | pooled µs CPU/req | pooled µs user | pooled µs system |")
print("|---|---|---|---|---|---|")
for arm, segs in arms.items():
    R = sum(x[0] for x in segs); N = sum(x[1] for x in segs)
    U = sum(x[2] for x in segs) / hz * 1e6 / R; S = sum(x[3] for x in segs) / hz * 1e6 / R
    tot = N / 1000 / R
    # Split the exact total by the sampled shares.
    us, ss = tot * U / (U + S), tot * S / (U + S)
    print(f"| {arm} | {statistics.median(x[0] for x in segs):,.0f} per segment | {statistics.median(per(x) for x in segs):.2f} | {tot:.2f} | {us:.2f} | {ss:.2f} |")
base = arms["plain"]
def summary(name, other):
    r = [(per(a) / per(b) - 1) * 100 for a, b in zip(other, base)]
    random.seed(1)
    boots = sorted(statistics.median(random.choices(r, k=len(r))) for _ in range(2000))
    lo, hi = boots[int(0.05 * len(boots))], boots[int(0.95 * len(boots)) - 1]
    pooled = (sum(x[1] for x in other) / sum(x[0] for x in other)) / (sum(x[1] for x in base) / sum(x[0] for x in base))
    print(f"| CPU added by {name} | median {statistics.median(r):+.1f}% (90% interval {lo:+.1f} to {hi:+.1f}), pooled {(pooled - 1) * 100:+.1f}%; pairs {min(r):+.1f} to {max(r):+.1f} |")
print()
summary("a stored miss", arms["stored"])
if "nostore" in arms:
    summary("an unstored miss", arms["nostore"])
if "stored-B" in arms:
    print()
    print("second build (RINGWAY_BIN_B), the same arms against its own plain route:")
    base = arms["plain-B"]
    summary("a stored miss (B)", arms["stored-B"])
    if "nostore-B" in arms:
        summary("an unstored miss (B)", arms["nostore-B"])
    print("B against A, arm by arm (same round):")
    for arm in [a for a in arms if not a.endswith("-B")]:
        base = arms[arm]
        summary(f"B over A on {arm}", arms[arm + "-B"])
PY
