#!/bin/bash
# Lazy restore of every function (or those named) with snaptier-lazy-pages, run INSIDE a
# testbed guest as root:
#
#   testbed/tb exec host0 -- bash /opt/snaptier/workloads/tests/lazy-restore.sh [FUNCTION...]
#
# For each function: start it (own pid namespace), invoke+check, digest, `criu dump`; then
# restore the same images three ways, one after the other:
#   criu      `criu lazy-pages` (CRIU's own daemon) + `criu restore --lazy-pages -d`   (baseline)
#   none      snaptier-lazy-pages --prefetch none + `criu restore --lazy-pages -d`
#   all       snaptier-lazy-pages --prefetch all --resume + `criu restore --lazy-pages
#             --leave-stopped -d` (every lazy page installed before the SIGCONT)
# each time invoke+check, digest equal to the original's, kill the restored tree, wait for
# the daemon to exit. Prints a table and "N passed, N failed"; exit 1 on any failure. Leaves
# no process behind.
#
# Environment: LAZY_DIR (default /tmp/snaptier-lazy), LAZY_KEEP=1 keeps images and logs,
# LAZY_BIN (default: the trixie build under /opt/snaptier/build/guest).
set -euo pipefail

workloads_dir=$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd)
. "$workloads_dir/tests/lib.sh"
repo_dir=$(cd "$workloads_dir/.." && pwd)
bin_dir=$workloads_dir/bin
lazy_bin=${LAZY_BIN:-$repo_dir/build/guest/tier-agent/snaptier-lazy-pages}
lazy_dir=${LAZY_DIR:-/tmp/snaptier-lazy}
start_timeout_s=300
invoke_timeout_s=120
criu_timeout_s=300
policies=(criu none all)

[ "$(id -u)" = 0 ] || { echo "lazy-restore: run as root (criu needs it)" >&2; exit 2; }
command -v criu > /dev/null || { echo "lazy-restore: criu is not installed" >&2; exit 2; }
[ -x "$lazy_bin" ] || { echo "lazy-restore: $lazy_bin missing (bash guests/build-agent.sh --target snaptier-lazy-pages on the host)" >&2; exit 2; }

select_functions "$@"


# Numbers from the daemon's metrics JSON: faults pages_copied prefetched first_fault_ms.
metrics_of() {
    python3 - "$1" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))
e = j["engine"]
ff = e.get("first_fault_ns")
print("%d(%dz)" % (e["faults"]["total"], e["faults"]["zero_filled"]), e.get("bytes_copied", 0) // 4096, j.get("prefetched_pages", 0),
      "-" if ff is None else "%.1f" % (ff / 1e6), "ok" if j.get("ok") else "error:" + str(j.get("error")))
EOF
}

lazy_one() {
    local name=$1 function_dir=$workloads_dir/$1
    work=$lazy_dir/$1 instance_pid="" restored_pid="" daemon_pid="" current_step=""
    cleanup() {
        local pid
        for pid in $instance_pid $restored_pid; do kill -KILL "$pid" 2>/dev/null || true; done
        for pid in $instance_pid $restored_pid; do wait_gone "$pid" || true; done
        if [ -n "$daemon_pid" ]; then
            kill -TERM "$daemon_pid" 2>/dev/null || true
            wait_gone "$daemon_pid" 10 || kill -KILL "$daemon_pid" 2>/dev/null || true
        fi
    }
    trap cleanup EXIT
    step() { current_step=$*; log "$name: $*"; }
    trap 'echo "at: $current_step" > "$work/failure"' ERR

    rm -rf "$work"
    mkdir -p "$work/images"
    local socket=$work/instance.sock

    step "start"
    instance_pid=$("$bin_dir/start-function" "$function_dir" --pidns --socket "$socket" \
        --ready "$work/ready" --log "$work/start.log" --timeout "$start_timeout_s")
    step "invoke+check before dump"
    "$bin_dir/invoke" "$socket" --example "$function_dir" --check "$function_dir" \
        --timeout "$invoke_timeout_s" > /dev/null
    local digest_before
    digest_before=$(json_field "$("$bin_dir/invoke" "$socket" --op digest --timeout "$invoke_timeout_s")" sha256)

    step "criu dump"
    timeout "$criu_timeout_s" criu dump -t "$instance_pid" -D "$work/images" -o "$work/dump.log" -v2 \
        || { tail -n 15 "$work/dump.log" >&2; false; }
    wait_gone "$instance_pid"
    instance_pid=""

    local policy
    : > "$work/rows"
    for policy in "${policies[@]}"; do
        local w=$work/$policy restore_args=(--lazy-pages) started restore_ms first_ms
        mkdir -p "$w"
        step "$policy: lazy-pages daemon"
        if [ "$policy" = criu ]; then
            criu lazy-pages -D "$work/images" -W "$w" -o "$w/lazy-pages.log" -v4 > /dev/null 2>&1 &
            daemon_pid=$!
        else
            local extra=()
            [ "$policy" = all ] && extra=(--resume) && restore_args+=(--leave-stopped)
            "$lazy_bin" --images "$work/images" --work-dir "$w" --prefetch "$policy" "${extra[@]}" \
                --timeout-s 600 --accept-timeout-s 120 --metrics-json "$w/metrics.json" \
                > "$w/report.json" 2> "$w/lazy-pages.log" &
            daemon_pid=$!
        fi
        local deadline=$((SECONDS + 30))
        until [ -S "$w/lazy-pages.socket" ]; do
            [ "$SECONDS" -lt "$deadline" ] && kill -0 "$daemon_pid" 2>/dev/null \
                || { log "$name/$policy: no lazy-pages.socket"; cat "$w/lazy-pages.log" >&2; false; }
            sleep 0.05
        done
        step "$policy: criu restore ${restore_args[*]}"
        started=$(now_ms)
        timeout "$criu_timeout_s" criu restore -D "$work/images" -W "$w" -d "${restore_args[@]}" \
            --pidfile "$w/pid" -o "$w/restore.log" -v2 \
            || { tail -n 15 "$w/restore.log" >&2; tail -n 5 "$w/lazy-pages.log" >&2; false; }
        restore_ms=$(( $(now_ms) - started ))
        restored_pid=$(cat "$w/pid")
        step "$policy: invoke+check"
        local response
        response=$("$bin_dir/invoke" "$socket" --example "$function_dir" --check "$function_dir" \
            --timing --timeout "$invoke_timeout_s")
        first_ms=$(json_field "$response" client_ms)
        step "$policy: digest"
        local digest_after
        digest_after=$(json_field "$("$bin_dir/invoke" "$socket" --op digest --timeout "$invoke_timeout_s")" sha256)
        [ "$digest_after" = "$digest_before" ] \
            || { log "$name/$policy: digest $digest_after != $digest_before"; false; }
        step "$policy: kill restored tree, wait for the daemon"
        kill -KILL "$restored_pid"
        wait_gone "$restored_pid"
        restored_pid=""
        local daemon_status=0
        if ! wait_gone "$daemon_pid" 30; then
            kill -TERM "$daemon_pid" 2>/dev/null || true
            wait_gone "$daemon_pid" 10 || kill -KILL "$daemon_pid" 2>/dev/null || true
        fi
        wait "$daemon_pid" 2>/dev/null || daemon_status=$?
        daemon_pid=""
        local faults="-" copied="-" prefetched="-" first_fault="-" result="ok"
        if [ "$policy" = criu ]; then
            copied=$(grep -c "uffd_copy" "$w/lazy-pages.log" || true)
            faults=$(grep -c "#PF at" "$w/lazy-pages.log" || true)
            copied="$copied copies"
        else
            local numbers
            numbers=$(metrics_of "$w/metrics.json")
            read -r faults copied prefetched first_fault result <<< "$numbers"
            [ "$result" = ok ] || { log "$name/$policy: daemon reported $result"; false; }
            [ "$daemon_status" = 0 ] || { log "$name/$policy: daemon exit $daemon_status"; false; }
        fi
        printf '%s|%s|%s|%s|%s|%s|%s|%s\n' "$name" "$policy" "$restore_ms" "${first_ms%.*}" \
            "$faults" "$copied" "$prefetched" "$first_fault" >> "$work/rows"
    done
}

mkdir -p "$lazy_dir"
run_functions lazy_one "$lazy_dir" "${LAZY_KEEP:-0}" \
    "function|policy|restore ms|1st invoke ms|faults|pages copied|prefetched|1st fault ms"
