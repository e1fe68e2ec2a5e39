# Shared helpers of the in-guest workload tests (criu-roundtrip.sh, lazy-restore.sh). Source it.
# shellcheck shell=bash

now_ms() { local t=$EPOCHREALTIME; echo $(( ${t%.*} * 1000 + 10#${t#*.} / 1000 )); }
json_field() { sed -n "s/.*\"$2\": \"\{0,1\}\([^\",}]*\).*/\1/p" <<< "$1"; }
log() { echo "[$(date +%T)] $*" >&2; }

# Waits until PID has exited, at most LIMIT seconds (default 30).
wait_gone() {
    local pid=$1 limit=${2:-30} deadline
    deadline=$((SECONDS + limit))
    while kill -0 "$pid" 2>/dev/null; do
        [ "$SECONDS" -lt "$deadline" ] || { log "pid $pid still alive after ${limit}s"; return 1; }
        sleep 0.1
    done
}

# Sets the global array `functions`: the names given, or every folder with a function.toml.
select_functions() {
    functions=()
    if [ $# -gt 0 ]; then
        functions=("$@")
        return
    fi
    local metadata
    for metadata in "$workloads_dir"/*/function.toml; do
        functions+=("$(basename "$(dirname "$metadata")")")
    done
}

# Prints HEADER and ROWS ('|'-separated cells) as aligned columns.
print_table() {
    { printf '%s\n' "$@"; } | awk -F'|' '
        { for (i = 1; i <= NF; i++) { cell[NR, i] = $i; if (length($i) > width[i]) width[i] = length($i) }
          if (NF > columns) columns = NF }
        END { for (r = 1; r <= NR; r++) { line = ""
                for (i = 1; i <= columns; i++) line = line sprintf("%-" width[i] + 2 "s", cell[r, i])
                sub(/ +$/, "", line); print line } }'
}

# Runs ONE NAME (a function of the calling script) for every selected function, in a subshell
# with `set -e`. A run leaves its table rows in BASE/NAME/rows, and BASE/NAME/failure when it
# fails. Prints the table under HEADER and "N passed, N failed"; returns 1 if any failed.
# KEEP=1 keeps the per-function work directories.
run_functions() {
    local one=$1 base=$2 keep=$3 header=$4
    local name work status row passed=0 failed=0
    local -a rows=()
    for name in "${functions[@]}"; do
        work=$base/$name
        if [ ! -f "$workloads_dir/$name/function.toml" ]; then
            rows+=("$name|-|-|-|-|-|-|FAILED: no such function"); failed=$((failed + 1)); continue
        fi
        set +e
        ( set -e; "$one" "$name" )
        status=$?
        set -e
        if [ -f "$work/rows" ]; then
            while IFS= read -r row; do rows+=("$row"); done < "$work/rows"
        fi
        if [ "$status" = 0 ] && [ -s "$work/rows" ]; then
            passed=$((passed + 1))
        else
            rows+=("$name|-|-|-|-|-|-|FAILED $(cat "$work/failure" 2>/dev/null || echo "(status $status)")")
            failed=$((failed + 1))
        fi
        [ "$keep" = 1 ] || rm -rf "$work"
    done
    [ "$keep" = 1 ] || rmdir "$base" 2>/dev/null || true
    echo
    print_table "$header" "${rows[@]}"
    echo
    echo "$passed passed, $failed failed"
    [ "$failed" = 0 ]
}
