#!/usr/bin/env bash
# ringway vs nginx vs haproxy, end to end on loopback. See perf/README.md.
#
#   bash perf/run.sh --quick      # 1 round of 2 s, two scenarios, small idle test (< 1 min)
#   bash perf/run.sh              # full matrix, 3 rounds of 10 s (about an hour on 2 cores)
#   bash perf/run.sh --no-build   # use target/release/ringway as it is
#
# Every other argument goes to perf/bench.py (see `python3 perf/bench.py --help`).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
cd "$repo"

build=1
args=()
for a in "$@"; do
    case "$a" in
        --no-build) build=0 ;;
        -h|--help) sed -n '2,9p' "$0"; exec python3 "$here/bench.py" --help ;;
        *) args+=("$a") ;;
    esac
done

log() { echo "[run.sh $(date +%H:%M:%S)] $*" >&2; }

# --- tools ---------------------------------------------------------------------------------
export PATH="$PATH:/usr/sbin:/sbin"
missing=()
command -v nginx >/dev/null 2>&1 || missing+=(nginx)
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
if ((${#missing[@]})); then
    log "installing missing tools: ${missing[*]}"
    sudo=""
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null 2>&1 || { log "not root and no sudo: install ${missing[*]} yourself"; exit 1; }
        sudo="sudo"
    fi
    $sudo apt-get update
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y "${missing[@]}"
fi
# The packages enable system services on install; this bench never uses them, and they are left
# as the system had them. Our own nginx/haproxy run from generated configs on 127.0.0.1:18000-18082.

# --- ringway build -------------------------------------------------------------------------
bin="$repo/target/release/ringway"
build_note="as found"
if ((build)); then
    stale=""
    if [ ! -x "$bin" ]; then
        stale="missing"
    elif [ -n "$(find src config Cargo.toml Cargo.lock -newer "$bin" -print -quit 2>/dev/null)" ]; then
        stale="older than the sources"
    fi
    if [ -n "$stale" ]; then
        log "target/release/ringway is $stale: cargo build --release (may take a few minutes)"
        if cargo build --release >&2; then
            build_note="built by run.sh"
        elif [ -x "$bin" ]; then
            log "WARNING: cargo build --release failed; benchmarking the existing (stale) binary"
            build_note="STALE: cargo build --release failed, existing binary used"
        else
            log "cargo build --release failed and there is no binary"; exit 1
        fi
    else
        build_note="up to date"
    fi
fi
[ -x "$bin" ] || { log "no $bin (run without --no-build)"; exit 1; }

# --- limits --------------------------------------------------------------------------------
# 10,000 idle connections need >10k descriptors in the client and in each proxy.
hard="$(ulimit -Hn)"
if [ "$hard" = unlimited ]; then ulimit -n 1048576 2>/dev/null || ulimit -n 65536; else
    ulimit -n 1048576 2>/dev/null || ulimit -n "$hard"; fi
log "open-file limit: $(ulimit -n)"

# --- scratch dir and cleanup ---------------------------------------------------------------
work="$(mktemp -d /tmp/ringway-perf.XXXXXX)"
chmod 755 "$work"
bench_pid=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$bench_pid" ] && kill -0 "$bench_pid" 2>/dev/null; then
        kill -TERM "$bench_pid" 2>/dev/null || true
        for _ in $(seq 1 200); do kill -0 "$bench_pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$bench_pid" 2>/dev/null || true
    fi
    # Every process bench.py started leads its own process group; kill what is left of them.
    if [ -f "$work/pids" ]; then
        while read -r pg; do
            [ -n "$pg" ] || continue
            if pgrep -g "$pg" >/dev/null 2>&1; then kill -TERM -- "-$pg" 2>/dev/null || true; fi
        done <"$work/pids"
        sleep 0.5
        while read -r pg; do
            [ -n "$pg" ] || continue
            if pgrep -g "$pg" >/dev/null 2>&1; then kill -KILL -- "-$pg" 2>/dev/null || true; fi
        done <"$work/pids"
    fi
    rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

export RINGWAY_LOG="${RINGWAY_LOG:-warn}"
python3 "$here/bench.py" --workdir "$work" --ringway "$bin" \
    --nginx "$(command -v nginx)" --haproxy "$(command -v haproxy)" --wrk "$(command -v wrk)" \
    --build-note "$build_note" "${args[@]+"${args[@]}"}" &
bench_pid=$!
set +e
wait "$bench_pid"
rc=$?
set -e
bench_pid=""
exit "$rc"
