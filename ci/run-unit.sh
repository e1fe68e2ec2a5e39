#!/usr/bin/env bash
# Stage 2 of CI: build for the host and run the unit tests (the README's test command).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. ci/lib.sh
t0=$SECONDS
make test
log "unit stage: $((SECONDS - t0)) s"
