#!/usr/bin/env bash
# The one command that reproduces BENCHMARKS.md: the criterion benches (each
# operation next to its by-hand floor and the peer crates), the contention
# harness, the signal latency, the resource counts, and a syscall count per
# acquire+drop cycle and per lost attempt. About 4 minutes on 2 cores;
# everything is logged to $CARGO_TARGET_DIR/bench-<time>.log.
#
#   ./bench.sh
#
# Every step runs even if an earlier one fails; the script exits 1 if any
# failed (a contention round without exactly one winner, a resource check,
# a signal run that timed out).
set -uo pipefail
cd "$(dirname "$0")"
export CARGO_TERM_COLOR=never
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
mkdir -p "$CARGO_TARGET_DIR"
log="$CARGO_TARGET_DIR/bench-$(date -u +%Y%m%dT%H%M%SZ).log"
exec > >(tee "$log") 2>&1

start=$SECONDS
failed=()
section() { printf '\n\n======== %s (t=%ss)\n\n' "$*" "$((SECONDS - start))"; }
step() {
    # Runs a command, remembering a failure instead of stopping.
    if ! "$@"; then
        failed+=("$*")
        echo "!!!!!!!! step failed: $*"
    fi
}

# tmpfs, as $XDG_RUNTIME_DIR usually is; the temp dir is the other filesystem.
shm=""
if [ -d /dev/shm ] && [ -w /dev/shm ]; then shm=/dev/shm; fi

section "machine"
echo "date:    $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo "nproc:   $(nproc)"
echo "cpu:     $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
echo "kernel:  $(uname -r)"
echo "rustc:   $(rustc --version)"
echo "cargo:   $(cargo --version)"
echo "load:    $(cat /proc/loadavg)"
echo "commit:  $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (+ uncommitted changes)')"
df -T "${TMPDIR:-/tmp}" ${shm:+"$shm"} 2>/dev/null | awk '{print "fs:      " $1, $2, $7}'

# All of it lives in the workspace member benches/ (its own manifest, so the
# root crate's dev-dependencies stay small); its binaries land in the shared
# target dir.
pkg=historia-lifecycle-benches

section "build"
step cargo bench -p "$pkg" --bench lifecycle --no-run
step cargo build --release -p "$pkg" --example contention --example signal_latency --example resources --example client_start
# The daemon that client_start starts, from the root crate.
step cargo build --release --example daemon
ex="$CARGO_TARGET_DIR/release/examples"

section "criterion: ours vs floor vs peers (benches/lifecycle.rs)"
step cargo bench -p "$pkg" --bench lifecycle

section "contention: racers in ${TMPDIR:-/tmp}"
step "$ex/contention"
if [ -n "$shm" ]; then
    section "contention: racers in $shm"
    step "$ex/contention" --dir "$shm" --rounds 100
fi

section "signal latency: ${TMPDIR:-/tmp}"
step "$ex/signal_latency"
if [ -n "$shm" ]; then
    section "signal latency: $shm"
    step "$ex/signal_latency" --dir "$shm"
fi

section "client: cold start vs the naive client, racing clients (${shm:-${TMPDIR:-/tmp}})"
step "$ex/client_start" --runs 40 --rounds 30 ${shm:+--dir "$shm"}

section "resources"
step "$ex/resources"

section "syscalls per acquire+drop cycle and per lost attempt (strace -c -f, 2000 each, ${shm:-${TMPDIR:-/tmp}})"
if command -v strace >/dev/null 2>&1; then
    n=2000
    for kind in floor ours-off ours-exit pid-guard floor-lose ours-lose; do
        out="$CARGO_TARGET_DIR/strace-$kind.txt"
        step strace -c -f -o "$out" "$ex/resources" profile "$kind" "$n" ${shm:+"$shm"}
        # strace -c columns: % time, seconds, usecs/call, calls, [errors], syscall
        awk -v n="$n" -v kind="$kind" '
            /^-|^%|total/ { next }
            NF >= 5 {
                calls = $4; name = (NF == 6 ? $6 : $5); errs = (NF == 6 ? $5 : 0)
                if (calls >= n / 2) {
                    per = int(calls / n + 0.5); total += per
                    line = line sprintf(" %s×%d%s", name, per, errs >= n / 2 ? sprintf(" (%d failing)", int(errs / n + 0.5)) : "")
                }
            }
            END { printf "%-10s %d syscalls/cycle:%s\n", kind, total, line }
        ' "$out"
    done
else
    echo "strace not installed: skipped"
fi

section "done"
echo "bench.sh runtime: $((SECONDS - start)) s"
echo "log: $log"
if [ ${#failed[@]} -gt 0 ]; then
    printf '!!!!!!!! FAILED STEP: %s\n' "${failed[@]}"
    exit 1
fi
