#!/usr/bin/env bash
# Hot reload under load (issue 11): wrk load, RELOADS reloads by SIGHUP alternating two valid
# configs with one invalid config in the middle, IDLE idle keep-alive connections and one
# streaming response open across all of them; then reloads without load up to TOTAL, for the
# RSS after 1 reload vs after TOTAL. Reports failed requests, cut connections, RSS, threads.
#
#   bash perf/reload.sh                       # 15 s of load (the stream lasts 20 s)
#   bash perf/reload.sh --duration 60         # the issue's figure: a 60 s stream
#   bash perf/reload.sh --no-build --reloads 100 --total-reloads 1000 --idle 1000
#
# Other arguments go to perf/reload.py (`python3 perf/reload.py --help`). Loopback only.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
cd "$repo"
build=1
args=()
for a in "$@"; do
    case "$a" in
        --no-build) build=0 ;;
        -h|--help) sed -n '2,10p' "$0"; exec python3 "$here/reload.py" --help ;;
        *) args+=("$a") ;;
    esac
done
command -v wrk >/dev/null || { echo "reload.sh needs wrk" >&2; exit 1; }
target="${CARGO_TARGET_DIR:-$repo/target}"
if ((build)); then
    cargo build --release >&2
fi
bin="$target/release/ringway"
[ -x "$bin" ] || { echo "no $bin (build with cargo build --release)" >&2; exit 1; }
echo "ringway $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) cores, $(uname -sr)" >&2
exec python3 "$here/reload.py" --binary "$bin" "${args[@]}"
