#!/usr/bin/env bash
# Stage 4 of CI: CRIU's zdtm suite in lazy-pages mode on this machine's kernel (the guests'
# trixie root, criu 4.1.1), with CRIU's daemon and the agent's in both prefetch modes, h and ns
# flavors. Fails when the agent's daemon fails a test that CRIU's passes (docs/zdtm.md). The
# table and results.{json,csv} are kept in $SNAPTIER_ARTIFACTS/zdtm (default build/ci-artifacts).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. ci/lib.sh
artifacts=${SNAPTIER_ARTIFACTS:-build/ci-artifacts}
t0=$SECONDS
make -s image guest-agent
bash tests/zdtm/zdtm.sh --out "$artifacts/zdtm"
log "zdtm stage: $((SECONDS - t0)) s; results in $artifacts/zdtm"
