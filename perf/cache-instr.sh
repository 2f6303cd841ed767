#!/usr/bin/env bash
# The response cache's own cost (issue 12) in instructions: callgrind counts of the gateway
# process per request, which do not move with the load of a shared machine the way CPU time
# and req/s do. User space only (the kernel's share of a request, the same with or without a
# cache, is not counted). One worker, keep-alive requests on one connection, an nginx origin
# with 1 KiB answers (`Cache-Control: max-age=3600`; under /ns/ `no-store`), four cases:
#   stored  - cached route, a new URL per request (each a miss that is stored; the budget is
#             filled first, so every store evicts)
#   plain   - the same route without a cache, a new URL per request
#   nostore - cached route, the origin says no-store (nothing stored)
#   hit     - cached route, the same URL again and again
#
#   cargo build --release && bash perf/cache-instr.sh [requests=2000] [budget=64MiB] [fill=60000]
# RINGWAY_BIN=path/to/ringway runs another build; ORIGIN_PORT / GW_PORT (18400 / 18480) the ports.
# CACHESIM=1 also simulates the data caches (slower) and prints the misses per request of a
# first level of 48 KiB and of a second of LL_BYTES (default 2 MiB, 16-way: one core's L2 here),
# what instruction counts do not show: a stored miss writes its object into memory that
# eviction freed, long out of cache.
# Needs nginx and valgrind (apt-get install -y nginx-light valgrind). Loopback only.
set -euo pipefail
N=${1:-2000}; BUDGET=${2:-64MiB}; FILL=${3:-60000}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${RINGWAY_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/ringway}
ORIGIN=${ORIGIN_PORT:-18400}; GW=${GW_PORT:-18480}
command -v nginx >/dev/null && command -v valgrind >/dev/null || { echo "needs nginx and valgrind"; exit 2; }
[[ -x $BIN ]] || { echo "no $BIN: cargo build --release first"; exit 2; }
D=$(mktemp -d /tmp/ringway-cache-instr.XXXXXX)
chmod 755 "$D"
VP=""
. "$ROOT/perf/lib.sh"
cleanup() {
  if [[ -n $VP ]]; then kill -9 "$VP" 2>/dev/null || true; wait "$VP" 2>/dev/null || true; fi
  ng_stop
  [[ -n ${KEEP:-} ]] && { echo "kept $D"; return; }
  rm -rf "$D"
}
trap cleanup EXIT

cache_configs $ORIGIN $GW "$BUDGET"
ng_start origin

# N GET requests on one keep-alive connection; `{i}` in the path is the request number.
cat > "$D/client.py" <<'EOF'
import socket, sys
port, n, pat = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
s = socket.create_connection(("127.0.0.1", port)); buf = b""
for i in range(n):
    s.sendall(b"GET " + pat.replace("{i}", str(i)).encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    while b"\r\n\r\n" not in buf:
        d = s.recv(65536)
        if not d: raise EOFError
        buf += d
    head, buf = buf.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200"), head[:40]
    cl = next(int(l.split(b":", 1)[1]) for l in head.split(b"\r\n")[1:]
              if l.split(b":", 1)[0].strip().lower() == b"content-length")
    while len(buf) < cl:
        d = s.recv(65536)
        if not d: raise EOFError
        buf += d
    buf = buf[cl:]
EOF

SIM=()
[[ -n ${CACHESIM:-} ]] && SIM=(--cache-sim=yes --D1=49152,12,64 "--LL=${LL_BYTES:-2097152},16,64")
RINGWAY_LOG=warn valgrind --tool=callgrind --instr-atstart=no "${SIM[@]}" --callgrind-out-file="$D/cg.out" \
  "$BIN" run -c "$D/ringway.toml" --workers 1 > "$D/valgrind.log" 2>&1 &
VP=$!
up=""
for _ in $(seq 300); do
  curl -s -o /dev/null -m 2 "http://127.0.0.1:$GW/plain/up" && { up=1; break; }
  sleep 0.2
done
[[ -n $up ]] || { echo "ringway did not start under valgrind: $D/valgrind.log"; KEEP=1; exit 1; }
# Not counted: fill the store (so that each stored miss evicts) and warm every path.
python3 "$D/client.py" "$GW" "$FILL" "/fill/{i}"
python3 "$D/client.py" "$GW" 300 "/plain/warm{i}"
python3 "$D/client.py" "$GW" 300 "/ns/warm{i}"
python3 "$D/client.py" "$GW" 300 "/hit"
k=0
for case in "stored:/m/{i}" "plain:/plain/{i}" "nostore:/ns/{i}" "hit:/hit"; do
  name=${case%%:*}; path=${case#*:}
  callgrind_control -z "$VP" >/dev/null
  callgrind_control -i on "$VP" >/dev/null
  python3 "$D/client.py" "$GW" "$N" "$path"
  callgrind_control -i off "$VP" >/dev/null
  callgrind_control -d "$VP" >/dev/null
  k=$((k + 1))
  # (awk reads to the end: an early exit would fail the pipe under pipefail)
  total=$(callgrind_annotate "$D/cg.out.$k" 2>/dev/null \
    | awk '/PROGRAM TOTALS/ && !t { gsub(",", "", $1); t = $1 } END { print t + 0 }')
  printf '%-8s %8d instructions/request (user space)\n' "$name" $((total / N))
  if [[ -n ${CACHESIM:-} ]]; then
    # Events: Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw.
    callgrind_annotate "$D/cg.out.$k" 2>/dev/null | awk -v n="$N" '/PROGRAM TOTALS/ && !t {
      t = 1; for (i = 1; i <= NF; i++) gsub(",", "", $i)
      # With percentages the columns alternate: value, (percent).
      j = 0; for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+$/) v[++j] = $i
      printf "         data misses/request: first level %.1f read + %.1f write, second level %.1f read + %.1f write\n", v[5]/n, v[6]/n, v[8]/n, v[9]/n }'
  fi
done
