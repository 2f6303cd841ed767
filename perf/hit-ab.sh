#!/usr/bin/env bash
# Cache hits (issue 12: req/s at least 1.5x nginx's, CPU per hit at most nginx's), ringway and
# nginx `proxy_cache` (memory-backed, tmpfs) side by side: one worker each, the same 1 KiB
# object, wrk at CONNS connections. What perf/cache.sh's 3-5 rounds of seconds apart cannot
# give: the targets run in short segments in turn (the order rotated each round), so a drift of
# the machine's speed reaches all of them alike, and the summary is over many rounds (medians,
# per-round ratios with a bootstrap 90% interval). CPU is each process's scheduler clock
# (/proc/PID/task/*/schedstat, nanoseconds, not tick-sampled).
#
#   cargo build --release && bash perf/hit-ab.sh [rounds=10] [seconds=2] [conns=32]
# RINGWAY_BIN=path/to/ringway (default target/release/ringway); RINGWAY_BIN_B and RINGWAY_BIN_C
# run more builds as more targets (each its own process and port): builds against the same
# nginx in the same run, each also against the first. PIN=0 to not pin (default with 5+ CPUs:
# each proxy on a CPU of its own, 1 to 4, wrk and the origin on CPU 0; req/s is then bound by the
# proxy).
# Needs nginx and wrk. Load only ever goes to 127.0.0.1.
set -euo pipefail
ROUNDS=${1:-10}; SECS=${2:-2}; CONNS=${3:-32}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${RINGWAY_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/ringway}
ORIGIN=${ORIGIN_PORT:-18600}; GW=${GW_PORT:-18680}; NG=$((GW + 10))
command -v nginx >/dev/null && command -v wrk >/dev/null || { echo "needs nginx and wrk"; exit 2; }
[[ -x $BIN ]] || { echo "no $BIN: cargo build --release first"; exit 2; }
for b in "${RINGWAY_BIN_B:-}" "${RINGWAY_BIN_C:-}"; do [[ -z $b || -x $b ]] || { echo "no $b"; exit 2; }; done
D=$(mktemp -d /tmp/ringway-hit-ab.XXXXXX)
SHM=$(mktemp -d /dev/shm/ringway-hit-ab.XXXXXX)
# nginx workers run as an unprivileged user when started as root.
chmod 755 "$D"; chmod 777 "$SHM"
GWPID=""; GWPID_B=""; GWPID_C=""
. "$ROOT/perf/lib.sh"
cleanup() {
  local p
  for p in $GWPID $GWPID_B $GWPID_C; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  ng_stop
  [[ -n ${KEEP:-} ]] && { echo "kept $D"; return; }
  rm -rf "$D" "$SHM"
}
trap cleanup EXIT

LOAD_CPU=(); CPU1=(); CPU2=(); CPU3=(); CPU4=()
if [[ ${PIN:-1} != 0 ]] && (( $(nproc) >= 5 )); then
  LOAD_CPU=(taskset -c 0); CPU1=(taskset -c 1); CPU2=(taskset -c 2); CPU3=(taskset -c 3)
  CPU4=(taskset -c 4)
fi
cache_configs "$ORIGIN" "$GW" 64MiB
"${LOAD_CPU[@]}" nginx -p "$D" -c "$D/origin.conf" -e "$D/origin.err"
RINGWAY_LOG=warn "${CPU1[@]}" "$BIN" -c "$D/ringway.toml" 2> "$D/ringway.log" &
GWPID=$!
if [[ -n ${RINGWAY_BIN_B:-} ]]; then
  sed "s/127.0.0.1:$GW\"/127.0.0.1:$((GW + 1))\"/" "$D/ringway.toml" > "$D/ringway-b.toml"
  RINGWAY_LOG=warn "${CPU2[@]}" "$RINGWAY_BIN_B" -c "$D/ringway-b.toml" 2> "$D/ringway-b.log" &
  GWPID_B=$!
fi
if [[ -n ${RINGWAY_BIN_C:-} ]]; then
  sed "s/127.0.0.1:$GW\"/127.0.0.1:$((GW + 2))\"/" "$D/ringway.toml" > "$D/ringway-c.toml"
  RINGWAY_LOG=warn "${CPU4[@]}" "$RINGWAY_BIN_C" -c "$D/ringway-c.toml" 2> "$D/ringway-c.log" &
  GWPID_C=$!
fi
{ ng_head nginx 1; ng_upstream "$ORIGIN" 64
  echo "  proxy_cache_path $SHM/ng levels=1:2 keys_zone=c:64m max_size=512m inactive=60m use_temp_path=off;
  server { listen 127.0.0.1:$NG backlog=4096;
    location / { $NG_PASS proxy_cache c; proxy_cache_lock on; add_header X-Cache \$upstream_cache_status; } } }"
} > "$D/nginx.conf"
"${CPU3[@]}" nginx -p "$D" -c "$D/nginx.conf" -e "$D/nginx.err"
URLS=("http://127.0.0.1:$GW/hit" "http://127.0.0.1:$NG/hit")
[[ -n $GWPID_B ]] && URLS+=("http://127.0.0.1:$((GW + 1))/hit")
[[ -n $GWPID_C ]] && URLS+=("http://127.0.0.1:$((GW + 2))/hit")
wait_200 "${URLS[@]}"
# Each target's second GET must be a hit.
for u in "${URLS[@]}"; do
  h=$(curl -s -D - -o /dev/null "$u" | grep -i '^cache-status\|^x-cache' | tr -d '\r')
  echo "$u: $h"
  grep -qi 'hit' <<<"$h" || { echo "$u did not answer from its cache"; exit 1; }
done
NGW=$(pgrep -P "$(cat "$D/nginx.pid")" -f 'worker process')
# Nanoseconds on CPU of the processes given (all their threads).
cpu_of() {
  local ns=0 p t
  for p in "$@"; do
    for t in /proc/"$p"/task/*/schedstat; do
      ns=$((ns + $(cut -d' ' -f1 "$t" 2>/dev/null || echo 0)))
    done
  done
  echo "$ns"
}
# segment NAME URL PID: one wrk run of SECS; appends "NAME round req/s requests ns p50-ms p99-ms".
segment() {
  local a b out
  a=$(cpu_of "$3")
  out=$("${LOAD_CPU[@]}" wrk -t1 -c"$CONNS" -d"${SECS}s" --latency "$2")
  b=$(cpu_of "$3")
  grep -q "Non-2xx" <<<"$out" && { echo "non-2xx answers from $1"; exit 1; }
  python3 - "$1" "$round" "$((b - a))" <<PY >> "$D/segments"
import re, sys
out = """$out"""
def ms(label):
    m = re.search(label + r"\s+([\d.]+)(us|ms|s)\b", out)
    v = float(m.group(1)); return v / 1000 if m.group(2) == "us" else v * 1000 if m.group(2) == "s" else v
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
reqs = int(re.search(r"(\d+) requests in", out).group(1))
print(sys.argv[1], sys.argv[2], rps, reqs, sys.argv[3], ms("50%"), ms("99%"))
PY
}
TARGETS=("ringway ${URLS[0]} $GWPID" "nginx ${URLS[1]} $NGW")
[[ -n $GWPID_B ]] && TARGETS+=("ringway-B http://127.0.0.1:$((GW + 1))/hit $GWPID_B")
[[ -n $GWPID_C ]] && TARGETS+=("ringway-C http://127.0.0.1:$((GW + 2))/hit $GWPID_C")
# Warm-up.
for t in "${TARGETS[@]}"; do set -- $t; "${LOAD_CPU[@]}" wrk -t1 -c"$CONNS" -d1s "$2" >/dev/null; done
: > "$D/segments"
for round in $(seq "$ROUNDS"); do
  r=$(( (round - 1) % ${#TARGETS[@]} ))
  order=("${TARGETS[@]:r}" "${TARGETS[@]:0:r}")
  for t in "${order[@]}"; do segment $t; done
done
python3 - "$D/segments" <<'PY'
import random, statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
by = {}
for name, rnd, rps, reqs, ns, p50, p99 in rows:
    by.setdefault(name, {})[int(rnd)] = (float(rps), int(ns) / 1000 / int(reqs), float(p50), float(p99))
med = statistics.median
print("\n| target | req/s (median) | µs CPU per hit | p50 ms | p99 ms |")
print("|---|---:|---:|---:|---:|")
for name, rs in by.items():
    v = list(rs.values())
    print(f"| {name} | {med(x[0] for x in v):,.0f} | {med(x[1] for x in v):.2f} | "
          f"{med(x[2] for x in v):.3f} | {med(x[3] for x in v):.3f} |")
random.seed(12)
def interval(xs):
    boots = sorted(med(random.choices(xs, k=len(xs))) for _ in range(2000))
    return boots[100], boots[1899]
print("\n| ratio, per round | median | 90% interval | rounds |")
print("|---|---:|---|---|")
for name in by:
    if name == "nginx":
        continue
    common = sorted(set(by[name]) & set(by["nginx"]))
    for what, i, inv in (("req/s", 0, False), ("CPU per hit", 1, False)):
        xs = [by[name][r][i] / by["nginx"][r][i] for r in common]
        lo, hi = interval(xs)
        print(f"| {name} / nginx, {what} | {med(xs):.3f}x | {lo:.3f}x to {hi:.3f}x | "
              f"{' '.join(f'{x:.2f}' for x in xs)} |")
for other in ("ringway-B", "ringway-C"):
    if other not in by:
        continue
    common = sorted(set(by["ringway"]) & set(by[other]))
    for what, i in (("req/s", 0), ("CPU per hit", 1)):
        xs = [by["ringway"][r][i] / by[other][r][i] for r in common]
        lo, hi = interval(xs)
        print(f"| ringway / {other}, {what} | {med(xs):.3f}x | {lo:.3f}x to {hi:.3f}x | "
              f"{' '.join(f'{x:.2f}' for x in xs)} |")
PY
