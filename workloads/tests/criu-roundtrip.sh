#!/bin/bash
# CRIU round trip of every function (or those named), run INSIDE a testbed guest as root:
#
#   testbed/tb exec host0 -- bash /opt/snaptier/workloads/tests/criu-roundtrip.sh [FUNCTION...]
#
# For each function: start it in its own pid namespace, wait until ready, invoke the example
# and check the output, take the state digest, `criu dump` it (which kills it), restore two
# copies from the same images side by side (each in a fresh pid namespace, each on its own
# socket), invoke+check both, compare their digests with the original's, kill them. Prints a
# table and "N passed, N failed"; exits 1 if any function failed. Leaves no process behind.
#
# Environment: ROUNDTRIP_DIR (default /tmp/snaptier-roundtrip; images go there, so it must
# hold ~1.5x the largest function's RSS), ROUNDTRIP_KEEP=1 keeps images and logs.
set -euo pipefail

workloads_dir=$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd)
. "$workloads_dir/tests/lib.sh"
bin_dir=$workloads_dir/bin
roundtrip_dir=${ROUNDTRIP_DIR:-/tmp/snaptier-roundtrip}
start_timeout_s=300    # numpy import + a 128 MiB table under TCG take tens of seconds at worst
invoke_timeout_s=120
criu_timeout_s=300
restored_copies=2

[ "$(id -u)" = 0 ] || { echo "criu-roundtrip: run as root (criu needs it)" >&2; exit 2; }
command -v criu > /dev/null || { echo "criu-roundtrip: criu is not installed" >&2; exit 2; }

select_functions "$@"


# The round trip of one function; runs in a subshell with `set -e`, writes its table row to
# $work/row. Any failing command fails the function (the message says which step).
roundtrip_one() {
    local name=$1 function_dir=$workloads_dir/$1
    # Not local: the EXIT and ERR traps run after this function has returned.
    work=$roundtrip_dir/$1 instance_pid="" restored_pids=() current_step=""
    cleanup() {
        local pid
        for pid in $instance_pid "${restored_pids[@]}"; do
            kill -KILL "$pid" 2>/dev/null || true   # the namespace init: its whole namespace dies
        done
        for pid in $instance_pid "${restored_pids[@]}"; do wait_gone "$pid" || true; done
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
    local init_ms
    init_ms=$(json_field "$(cat "$work/ready")" init_ms)

    step "invoke+check before dump"
    "$bin_dir/invoke" "$socket" --example "$function_dir" --check "$function_dir" \
        --timeout "$invoke_timeout_s" > "$work/invoke-original.json"
    local digest_before stats rss_bytes
    step "digest before dump"
    digest_before=$(json_field "$("$bin_dir/invoke" "$socket" --op digest --timeout "$invoke_timeout_s")" sha256)
    stats=$("$bin_dir/invoke" "$socket" --op stats --timeout "$invoke_timeout_s")
    rss_bytes=$(json_field "$stats" rss_bytes)

    step "criu dump"
    local started dump_ms
    started=$(now_ms)
    timeout "$criu_timeout_s" criu dump -t "$instance_pid" -D "$work/images" -o "$work/dump.log" -v2 \
        || { tail -n 15 "$work/dump.log" >&2; false; }
    dump_ms=$(( $(now_ms) - started ))
    wait_gone "$instance_pid"
    instance_pid=""
    local image_bytes
    image_bytes=$(du -cb "$work/images"/*.img | tail -n 1 | cut -f1)

    local copy restore_ms=() first_invoke_ms=() digests_match=yes
    for copy in $(seq 1 "$restored_copies"); do
        step "restore copy $copy"
        started=$(now_ms)
        restored_pids+=("$("$bin_dir/restore-function" "$work/images" --dumped-socket "$socket" \
            --socket "$work/copy$copy.sock" --timeout "$criu_timeout_s")")
        restore_ms+=($(( $(now_ms) - started )))
    done
    for copy in $(seq 1 "$restored_copies"); do
        step "invoke+check copy $copy"
        local response
        response=$("$bin_dir/invoke" "$work/copy$copy.sock" --example "$function_dir" \
            --check "$function_dir" --timing --timeout "$invoke_timeout_s")
        first_invoke_ms+=("$(json_field "$response" client_ms)")
        step "digest copy $copy"
        local digest_after
        digest_after=$(json_field "$("$bin_dir/invoke" "$work/copy$copy.sock" --op digest --timeout "$invoke_timeout_s")" sha256)
        if [ "$digest_after" != "$digest_before" ]; then
            log "$name: copy $copy digest $digest_after != $digest_before"
            digests_match=no
        fi
        # Each copy must be its own namespace's init, under its own host pid.
        stats=$("$bin_dir/invoke" "$work/copy$copy.sock" --op stats --timeout "$invoke_timeout_s")
        [ "$(json_field "$stats" ns_pid)" = 1 ] && [ "$(json_field "$stats" pid)" = "${restored_pids[$((copy - 1))]}" ] \
            || { log "$name: copy $copy stats $stats do not match restored pid ${restored_pids[$((copy - 1))]}"; false; }
    done
    [ "$digests_match" = yes ] || { current_step="digest comparison"; false; }

    printf '%s|%s|%s|%s|%s|%s|%s|%s\n' "$name" "${init_ms%.*}" "$((rss_bytes / 1048576))" \
        "$((image_bytes / 1048576))" "$dump_ms" "$(IFS=/; echo "${restore_ms[*]}")" \
        "$(IFS=/; printf '%s' "${first_invoke_ms[*]%.*}")" "$digests_match ($restored_copies copies)" > "$work/rows"
}

mkdir -p "$roundtrip_dir"
run_functions roundtrip_one "$roundtrip_dir" "${ROUNDTRIP_KEEP:-0}" \
    "function|init ms|rss MB|image MB|dump ms|restore ms (copy1/copy2)|1st invoke ms (copy1/copy2)|digest match"
