#!/usr/bin/env bash
# Metrics (and the access log) on vs off, end to end: three ringway processes (release build)
# in front of the same nginx origin (64-byte answers), identical but for
#   off:  [metrics] enabled = false, no access log
#   on:   [metrics] enabled = true (the default), no access log
#   log:  [metrics] enabled = true and [access_log] to a file in the scratch directory
# and, for the access log's cost, two nginx proxies (one worker, keepalive 512 to the origin)
# identical but for its own access log (off, or the default "combined" format to a file):
#   ngx_off, ngx_log
# With BASE_BIN=path, a sixth process runs that older ringway binary on the same config less the
# [metrics]/[access_log] tables ("base": what the request path cost before).
# Rounds run the three in turn with the same wrk load (keep-alive); each run prints req/s and
# that ringway's CPU time per request (user + system, from /proc), then the median ratios
# against "off". On a shared machine req/s swings with the neighbours' load; CPU per request
# is the steadier figure.
#
#   cargo build --release && bash perf/observability.sh [rounds=3] [seconds=5] [workers=1] [conns=64]
# The binary is ${CARGO_TARGET_DIR:-target}/release/ringway (RINGWAY_BIN=path: another). Load only ever goes to 127.0.0.1.
set -euo pipefail
ROUNDS=${1:-3}; SECS=${2:-5}; WORKERS=${3:-1}; CONNS=${4:-64}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${RINGWAY_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/ringway}
[[ -x $BIN ]] || { echo "no $BIN: cargo build --release first"; exit 1; }
D=$(mktemp -d /tmp/ringway-obs-perf.XXXXXX)
ORIGIN=18200
declare -A PORT=([off]=18281 [on]=18282 [log]=18283 [ngx_off]=18291 [ngx_log]=18292 [base]=18284)
MODES=(off on log)
[[ -n ${BASE_BIN:-} ]] && MODES+=(base)
declare -A PID=()
. "$ROOT/perf/lib.sh"
cleanup() {
  for p in "${PID[@]}"; do kill "$p" 2>/dev/null || true; done
  ng_stop
  rm -rf "$D"
}
trap cleanup EXIT
{ ng_head origin 1
  echo "  server { listen 127.0.0.1:$ORIGIN backlog=4096; location / { default_type text/plain; return 200 \"$(printf '%063d' 0)\n\"; } } }"
} > "$D/origin.conf"
ng_start origin
for mode in ngx_off ngx_log; do
  log=""
  [[ $mode == ngx_log ]] && log="access_log $D/nginx-access.log combined;"
  { ng_head "$mode" 1; ng_upstream $ORIGIN 512
    echo "  server { listen 127.0.0.1:${PORT[$mode]} backlog=4096; $log location / { $NG_PASS } } }"
  } > "$D/$mode.conf"
  ng_start "$mode"
done
for mode in "${MODES[@]}"; do
  {
    rw_head "${PORT[$mode]}" $ORIGIN "$WORKERS"
    echo "[[routes]]"
    echo "name = \"all\""
    echo "upstream = \"origin\""
    echo "set_host = \"origin\""
    if [[ $mode != base ]]; then
      echo "[metrics]"
      [[ $mode == off ]] && echo "enabled = false" || echo "enabled = true"
    fi
    if [[ $mode == log ]]; then
      echo "[access_log]"
      echo "enabled = true"
      echo "output = \"$D/access.log\""
    fi
  } > "$D/$mode.toml"
  bin=$BIN; [[ $mode == base ]] && bin=$BASE_BIN
  RINGWAY_LOG=warn "$bin" -c "$D/$mode.toml" & PID[$mode]=$!
done
for mode in ngx_off ngx_log; do
  for _ in $(seq 50); do [[ -s $D/$mode.pid ]] && break; sleep 0.1; done
  # The worker does the work; the master only waits.
  for _ in $(seq 50); do PID[$mode]=$(pgrep -P "$(cat "$D/$mode.pid")" | head -1) && [[ -n ${PID[$mode]} ]] && break; sleep 0.1; done
done
for mode in "${MODES[@]}" ngx_off ngx_log; do
  for _ in $(seq 50); do curl -s -o /dev/null "http://127.0.0.1:${PORT[$mode]}/" && break; sleep 0.1; done
  code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:${PORT[$mode]}/")
  [[ $code == 200 ]] || { echo "$mode answered $code"; exit 1; }
done
HZ=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# Prints "req/s µs-of-CPU-per-request" for one mode.
run() {
  local mode=$1 t0 t1 rps
  t0=$(cpu_ticks "${PID[$mode]}")
  rps=$(wrk -t1 -c"$CONNS" -d"${SECS}s" "http://127.0.0.1:${PORT[$mode]}/" | awk '/Requests\/sec/ {print $2} /Non-2xx/ {print "ERR " $0 > "/dev/stderr"}')
  t1=$(cpu_ticks "${PID[$mode]}")
  python3 -c "print($rps, round(($t1 - $t0) / $HZ * 1e6 / ($rps * $SECS), 3))"
}
for mode in "${MODES[@]}" ngx_off ngx_log; do wrk -t1 -c"$CONNS" -d1s "http://127.0.0.1:${PORT[$mode]}/" >/dev/null; done
on_r=(); log_r=(); rw_add=(); ngx_add=(); ngx_r=(); base_r=()
for r in $(seq "$ROUNDS"); do
  read -r off off_cpu < <(run off)
  read -r on on_cpu < <(run on)
  read -r lg lg_cpu < <(run log)
  if [[ -n ${BASE_BIN:-} ]]; then
    read -r bs bs_cpu < <(run base)
    base_r+=("$(python3 -c "print(f'{$on_cpu/$bs_cpu:.3f}')")")
    echo "round $r: base ${bs} req/s ${bs_cpu} µs CPU/req"
  fi
  read -r nx nx_cpu < <(run ngx_off)
  read -r nl nl_cpu < <(run ngx_log)
  on_r+=("$(python3 -c "print(f'{$on_cpu/$off_cpu:.3f}')")")
  rw_add+=("$(python3 -c "print(f'{$lg_cpu-$on_cpu:.3f}')")")
  ngx_add+=("$(python3 -c "print(f'{$nl_cpu-$nx_cpu:.3f}')")")
  ngx_r+=("$(python3 -c "print(f'{$nl_cpu/$nx_cpu:.3f}')")")
  log_r+=("$(python3 -c "print(f'{$lg_cpu/$off_cpu:.3f}')")")
  echo "round $r: off ${off} req/s ${off_cpu} µs CPU/req; metrics ${on} req/s ${on_cpu} µs; metrics+access log ${lg} req/s ${lg_cpu} µs; nginx ${nx} req/s ${nx_cpu} µs; nginx+access log ${nl} req/s ${nl_cpu} µs"
done
python3 -c "import statistics,sys; print('median CPU/req metrics on/off:', statistics.median(map(float, sys.argv[1:])))" "${on_r[@]}"
python3 -c "import statistics,sys; print('median CPU/req metrics+access log/off:', statistics.median(map(float, sys.argv[1:])))" "${log_r[@]}"
[[ -n ${BASE_BIN:-} ]] && python3 -c "import statistics,sys; print('median CPU/req metrics on (default) / base binary:', statistics.median(map(float, sys.argv[1:])))" "${base_r[@]}"
python3 -c "import statistics,sys; print('median CPU/req nginx access log/off:', statistics.median(map(float, sys.argv[1:])))" "${ngx_r[@]}"
python3 -c "import statistics,sys; print('median access log cost, µs CPU/req: ringway', statistics.median(map(float, sys.argv[1:])))" "${rw_add[@]}"
python3 -c "import statistics,sys; print('median access log cost, µs CPU/req: nginx  ', statistics.median(map(float, sys.argv[1:])))" "${ngx_add[@]}"
echo "access log lines written: ringway $(wc -l < "$D/access.log"), nginx $(wc -l < "$D/nginx-access.log")"
