#!/usr/bin/env bash
# JWT on vs off, end to end: wrk against two routes of one ringway (release build) in front of
# the same nginx origin (64-byte answers): /open (no auth) and /jwt (HS256 JWT, claims
# forwarded, the same token on every request: the per-core cache path). Rounds alternate the
# two routes; each run prints req/s and ringway's CPU time per request (user + system, from
# /proc), then the median ratios. On a shared machine req/s swings with the neighbours' load;
# CPU per request is the steadier figure.
#
#   cargo build --release && bash perf/auth.sh [rounds=3] [seconds=5] [workers=1] [conns=64]
# RINGWAY_BIN=path/to/ringway runs another build.
# Load only ever goes to 127.0.0.1.
set -euo pipefail
ROUNDS=${1:-3}; SECS=${2:-5}; WORKERS=${3:-1}; CONNS=${4:-64}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
D=$(mktemp -d /tmp/ringway-auth-perf.XXXXXX)
ORIGIN=18100; GW=18180
SECRET="perf-only-secret-of-at-least-32-bytes!"
. "$ROOT/perf/lib.sh"
cleanup() { [[ -n "${GWPID:-}" ]] && kill "$GWPID" 2>/dev/null; ng_stop; rm -rf "$D"; }
trap cleanup EXIT
{ ng_head origin 1
  echo "  server { listen 127.0.0.1:$ORIGIN backlog=4096; location / { default_type text/plain; return 200 \"$(printf '%063d' 0)\n\"; } } }"
} > "$D/origin.conf"
ng_start origin
{ rw_head $GW $ORIGIN "$WORKERS"; cat <<TOML
[[routes]]
path_prefix = "/open"
upstream = "origin"
set_host = "origin"
strip_prefix = "/open"
[[routes]]
path_prefix = "/jwt"
upstream = "origin"
set_host = "origin"
strip_prefix = "/jwt"
auth = { any_of = ["jwt"], scopes_all = ["read"] }
[auth.jwt.jwt]
secret = "$SECRET"
issuers = ["https://idp.example.com"]
audiences = ["api"]
forward_claims = { sub = "x-user-id" }
TOML
} > "$D/ringway.toml"
RINGWAY_LOG=warn "${RINGWAY_BIN:-$ROOT/target/release/ringway}" -c "$D/ringway.toml" & GWPID=$!
TOKEN=$(python3 - "$SECRET" <<'PY'
import base64, hashlib, hmac, json, sys, time
b = lambda x: base64.urlsafe_b64encode(x).rstrip(b"=").decode()
h = b(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
p = b(json.dumps({"sub": "user-1234567890", "iss": "https://idp.example.com", "aud": "api",
                  "exp": int(time.time()) + 3600, "scope": "read write", "tenant": "acme"}).encode())
s = b(hmac.new(sys.argv[1].encode(), f"{h}.{p}".encode(), hashlib.sha256).digest())
print(f"{h}.{p}.{s}")
PY
)
for _ in $(seq 50); do curl -s -o /dev/null "http://127.0.0.1:$GW/open/" && break; sleep 0.1; done
code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$GW/jwt/")
[[ $code == 200 ]] || { echo "JWT route answered $code"; exit 1; }
code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$GW/open/")
[[ $code == 200 ]] || { echo "open route answered $code"; exit 1; }
code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$GW/jwt/")
[[ $code == 401 ]] || { echo "JWT route without a token answered $code"; exit 1; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$GWPID/stat"; }
HZ=$(getconf CLK_TCK)
# Prints "req/s µs-of-CPU-per-request".
run() {
  local t0 t1 rps
  t0=$(cpu_ticks)
  rps=$(wrk -t1 -c"$CONNS" -d"${SECS}s" "$@" | awk '/Requests\/sec/ {print $2} /Non-2xx/ {print "ERR " $0 > "/dev/stderr"}')
  t1=$(cpu_ticks)
  python3 -c "print($rps, round(($t1 - $t0) / $HZ * 1e6 / ($rps * $SECS), 2))"
}
wrk -t1 -c"$CONNS" -d1s "http://127.0.0.1:$GW/open/" >/dev/null
wrk -t1 -c"$CONNS" -d1s -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$GW/jwt/" >/dev/null
ratios=(); cpus=()
for r in $(seq "$ROUNDS"); do
  read -r off off_cpu < <(run "http://127.0.0.1:$GW/open/")
  read -r on on_cpu < <(run -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$GW/jwt/")
  ratio=$(python3 -c "print(f'{$on/$off:.3f}')")
  cpu=$(python3 -c "print(f'{$on_cpu/$off_cpu:.3f}')")
  ratios+=("$ratio"); cpus+=("$cpu")
  echo "round $r: jwt off ${off} req/s ${off_cpu} µs CPU/req; jwt on ${on} req/s ${on_cpu} µs CPU/req; req/s on/off ${ratio}, CPU/req on/off ${cpu}"
done
python3 -c "import statistics,sys; print('median req/s on/off:', statistics.median(map(float, sys.argv[1:])))" "${ratios[@]}"
python3 -c "import statistics,sys; print('median CPU/req on/off:', statistics.median(map(float, sys.argv[1:])))" "${cpus[@]}"
