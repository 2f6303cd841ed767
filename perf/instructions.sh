#!/usr/bin/env bash
# User-space instructions per request, counted by callgrind: ringway (and optionally an older
# build of it) beside nginx as a reverse proxy, in front of the same nginx origin (64-byte
# answers), one worker each. Instruction counts do not move with the machine's load the way
# wall-clock figures do (±20% per round on the shared 2-core VM), so they show what a change
# of the user-space path is worth; they count nothing the kernel does (socket work, io_uring),
# which is most of a proxied request's cost: pair them with perf/run.sh.
#
#   cargo build --release && bash perf/instructions.sh [requests=3000] [idle=2000]
#   BASE_BIN=/path/to/old/ringway bash perf/instructions.sh     # an older build beside
#   NGINX=0 ...                                                  # without nginx
#
# Scenarios: 8 keep-alive connections; a new connection per request (8 at a time); 8 keep-alive
# connections while `idle` more connections sit idle (a cost that grows with idle connections
# shows here). Needs valgrind, nginx and python3. Load only ever goes to 127.0.0.1.
set -euo pipefail
N=${1:-3000}; IDLE=${2:-2000}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${RINGWAY_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/ringway}
BASE_BIN=${BASE_BIN:-}
NGINX=${NGINX:-1}
CLIENT="python3 $ROOT/perf/instr_client.py"
ORIGIN=18500; PORT=18580
for t in valgrind callgrind_control callgrind_annotate nginx python3; do
  command -v $t >/dev/null || { echo "needs $t (apt-get install -y valgrind nginx-light python3)"; exit 2; }
done
[[ -x $BIN ]] || { echo "no $BIN: cargo build --release first"; exit 2; }
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
D=$(mktemp -d /tmp/ringway-instr.XXXXXX); chmod 755 "$D"
. "$ROOT/perf/lib.sh"
VP=""; IP=""
cleanup() {
  [[ -n $IP ]] && kill "$IP" 2>/dev/null || true
  [[ -n $VP ]] && kill -9 "$VP" 2>/dev/null || true
  ng_stop
  rm -rf "$D"
}
trap cleanup EXIT
mkdir -p "$D/www"; head -c 64 /dev/zero | tr '\0' 'a' > "$D/www/b64"; chmod -R a+rX "$D/www"
{ ng_head origin 1
  echo "  sendfile on; server { listen 127.0.0.1:$ORIGIN backlog=4096; root $D/www; location / { } } }"
} > "$D/origin.conf"
ng_start origin
{ rw_head $PORT $ORIGIN; printf '[[routes]]\npath_prefix = "/"\nupstream = "origin"\n'; } > "$D/ringway.toml"
# nginx as the proxy: one process (no master), so that callgrind sees the worker.
{ ng_head proxy 1 off; ng_upstream $ORIGIN 256
  echo "  server { listen 127.0.0.1:$PORT backlog=4096; location / { $NG_PASS } } }"
} > "$D/proxy.conf"

# measure NAME SCENARIO CMD...: prints instructions per request
measure() {
  local name=$1 sc=$2; shift 2
  rm -f "$D"/cg.out*
  RINGWAY_LOG=warn valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$D/cg.out" "$@" \
    > "$D/vg.log" 2>&1 &
  VP=$!
  for _ in $(seq 200); do
    $CLIENT $PORT 1 1 ka /b64 2>/dev/null && break
    sleep 0.2
  done
  local mode=ka; [[ $sc == close ]] && mode=close
  $CLIENT $PORT 500 8 $mode /b64
  if [[ $sc == idle ]]; then
    $CLIENT --idle $PORT "$IDLE" 3600 > "$D/idle.out" &
    IP=$!
    for _ in $(seq 1200); do grep -q open "$D/idle.out" 2>/dev/null && break; sleep 0.5; done
    grep -q open "$D/idle.out" || { echo "$name: the idle connections did not open"; exit 1; }
  fi
  callgrind_control -i on $VP >/dev/null 2>&1
  $CLIENT $PORT "$N" 8 $mode /b64
  callgrind_control -i off $VP >/dev/null 2>&1
  callgrind_control -d $VP >/dev/null 2>&1
  [[ -n $IP ]] && { kill "$IP" 2>/dev/null || true; wait "$IP" 2>/dev/null || true; IP=""; }
  kill -9 $VP 2>/dev/null || true; wait $VP 2>/dev/null || true; VP=""
  local total
  total=$(for f in "$D"/cg.out*; do callgrind_annotate "$f" 2>/dev/null | grep -m1 "PROGRAM TOTALS" || true; done \
    | awk '{gsub(",","",$1); s+=$1} END {print s+0}')
  echo $((total / N))
}

declare -A R
targets=(ringway)
[[ -n $BASE_BIN ]] && targets+=(base)
[[ $NGINX == 1 ]] && targets+=(nginx)
for sc in ka close idle; do
  for t in "${targets[@]}"; do
    case $t in
      ringway) R[$t,$sc]=$(measure "$t" $sc "$BIN" run -c "$D/ringway.toml" --workers 1) ;;
      base) R[$t,$sc]=$(measure "$t" $sc "$BASE_BIN" run -c "$D/ringway.toml" --workers 1) ;;
      nginx) R[$t,$sc]=$(measure "$t" $sc nginx -p "$D" -c "$D/proxy.conf" -e "$D/proxy.err") ;;
    esac
    echo "  $sc $t: ${R[$t,$sc]} instructions/request" >&2
  done
done
label() { case $1 in ka) echo "64 B, 8 keep-alive connections";; close) echo "64 B, new connection per request";;
  idle) echo "64 B, 8 keep-alive connections, $IDLE more idle";; esac; }
printf '\n| scenario (user-space instructions per request) | ringway |'
[[ -n $BASE_BIN ]] && printf ' base | ringway ÷ base |'
[[ $NGINX == 1 ]] && printf ' nginx | ringway ÷ nginx |'
printf '\n|---|---:|'; [[ -n $BASE_BIN ]] && printf -- '---:|---:|'; [[ $NGINX == 1 ]] && printf -- '---:|---:|'; echo
for sc in ka close idle; do
  printf '| %s | %s |' "$(label $sc)" "${R[ringway,$sc]}"
  [[ -n $BASE_BIN ]] && printf ' %s | %s |' "${R[base,$sc]}" "$(python3 -c "print(f'{${R[ringway,$sc]}/${R[base,$sc]}:.3f}')")"
  [[ $NGINX == 1 ]] && printf ' %s | %s |' "${R[nginx,$sc]}" "$(python3 -c "print(f'{${R[ringway,$sc]}/${R[nginx,$sc]}:.3f}')")"
  echo
done
