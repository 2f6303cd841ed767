#!/usr/bin/env bash
# Where a stored miss's time goes, beyond instructions: a time profile of the gateway (`perf
# record -e cpu-clock`, a software clock, so it runs where the machine has no hardware
# counters, a VM), once under stored misses and once under the same route without a cache, and
# the difference per request by function. Instruction counts (perf/cache-instr.sh) do not see a
# load that waits on memory; this does, at the instruction (`perf annotate` on the data kept).
#
# Setup as perf/cache-ab.sh's: one worker, 1 KiB answers from an nginx origin, the 64 MiB
# budget filled first so that every stored miss evicts, wrk with 32 connections and a new URL
# per request; ringway on CPU 1, wrk and the origin on CPU 0 (with 2+ CPUs). Two rounds of
# each arm, in the order stored, plain, stored, plain.
#
#   cargo build --release && bash perf/cache-prof.sh [seconds=8] [rows=30]
# RINGWAY_BIN=path/to/ringway runs another build; KEEP=1 keeps the profiles (then, for one
# function: perf annotate -i DIR/stored-1.data --stdio -s 'ringway::cache::store::Store<V>::insert').
# Sampling skid puts a load's wait on the instruction after it. Read one run against another
# made on the same machine, quiet otherwise: µs per request move with the machine's load.
# Needs nginx, wrk and perf. Load only ever goes to 127.0.0.1.
set -euo pipefail
SECS=${1:-8}; ROWS=${2:-30}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${RINGWAY_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/ringway}
ORIGIN=${ORIGIN_PORT:-18610}; GW=${GW_PORT:-18690}
for t in nginx wrk perf; do command -v $t >/dev/null || { echo "needs $t"; exit 2; }; done
[[ -x $BIN ]] || { echo "no $BIN: cargo build --release first"; exit 2; }
D=$(mktemp -d /tmp/ringway-cache-prof.XXXXXX)
chmod 755 "$D"
GWPID=""
. "$ROOT/perf/lib.sh"
cleanup() {
  if [[ -n $GWPID ]]; then kill "$GWPID" 2>/dev/null || true; wait "$GWPID" 2>/dev/null || true; fi
  ng_stop
  [[ -n ${KEEP:-} ]] && { echo "kept $D"; return; }
  rm -rf "$D"
}
trap cleanup EXIT

PROXY_CPU=(); LOAD_CPU=()
if (( $(nproc) >= 2 )); then PROXY_CPU=(taskset -c 1); LOAD_CPU=(taskset -c 0); fi
cache_configs "$ORIGIN" "$GW" "${BUDGET:-64MiB}"
"${LOAD_CPU[@]}" nginx -p "$D" -c "$D/origin.conf" -e "$D/origin.err"
RINGWAY_LOG=warn "${PROXY_CPU[@]}" "$BIN" -c "$D/ringway.toml" 2> "$D/ringway.log" &
GWPID=$!
wait_200 "http://127.0.0.1:$GW/plain/up" "http://127.0.0.1:$GW/up"
unique_lua "$D/unique.lua"
# Fill the budget (64 MiB of 1 KiB objects: about 45,000).
for round in $(seq 4); do
  PREFIX=/fill$round/ "${LOAD_CPU[@]}" wrk -t1 -c32 -d4s -s "$D/unique.lua" "http://127.0.0.1:$GW" >/dev/null
done
for arm in stored-1:/m1/ plain-1:/plain/p1- stored-2:/m2/ plain-2:/plain/p2-; do
  name=${arm%%:*}; prefix=${arm#*:}
  PREFIX=$prefix "${LOAD_CPU[@]}" wrk -t1 -c32 -d$((SECS + 2))s -s "$D/unique.lua" \
    "http://127.0.0.1:$GW" > "$D/$name.wrk" &
  w=$!
  sleep 1
  perf record -q -e cpu-clock -F 20000 -p "$GWPID" -o "$D/$name.data" -- sleep "$SECS" 2>/dev/null
  wait "$w"
  grep -q "Non-2xx" "$D/$name.wrk" && { echo "non-2xx answers in $name"; exit 1; }
done

python3 - "$D" "$SECS" "$ROWS" <<'PY'
import collections, re, subprocess, sys
d, secs, rows = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
def load(name):
    out = subprocess.run(["perf", "report", "-i", f"{d}/{name}.data", "--no-children",
                          "--sort", "dso,sym", "-F", "sample,dso,sym", "--stdio"],
                         capture_output=True, text=True).stdout
    c = collections.Counter()
    for line in out.splitlines():
        m = re.match(r"\s*(\d+)\s+(\S+)\s+\[.\]\s+(.*)", line)
        if m:
            c[(m.group(2), m.group(3).strip())] += int(m.group(1))
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", open(f"{d}/{name}.wrk").read()).group(1))
    # A sample is 50 µs of the worker's CPU (20 kHz).
    return {k: v * 50 / (rate * secs) for k, v in c.items()}, rate
arms = {n: load(n) for n in ["stored-1", "plain-1", "stored-2", "plain-2"]}
def mean(*ps):
    keys = set().union(*ps)
    return {k: sum(p.get(k, 0) for p in ps) / len(ps) for k in keys}
s = mean(arms["stored-1"][0], arms["stored-2"][0])
p = mean(arms["plain-1"][0], arms["plain-2"][0])
kern = lambda m: sum(v for k, v in m.items() if k[0] == "[kernel.kallsyms]")
print("req/s: " + ", ".join(f"{n} {r:,.0f}" for n, (_, r) in arms.items()))
print("| µs per request | stored miss | plain route | added |")
print("|---|---|---|---|")
for label, f in [("all", lambda m: sum(m.values())), ("kernel", kern),
                 ("user (ringway, libc, vdso)", lambda m: sum(m.values()) - kern(m))]:
    print(f"| {label} | {f(s):.2f} | {f(p):.2f} | {f(s) - f(p):+.2f} |")
print()
print("| added µs | stored | plain | where |")
print("|---|---|---|---|")
for k in sorted(set(s) | set(p), key=lambda k: -abs(s.get(k, 0) - p.get(k, 0)))[:rows]:
    print(f"| {s.get(k, 0) - p.get(k, 0):+.3f} | {s.get(k, 0):.3f} | {p.get(k, 0):.3f} | {k[1][:100]} ({k[0]}) |")
PY
