#!/usr/bin/env bash
# Runs every check and every test of the workspace, on a fresh machine too:
#   1. installs SoftHSM2 and OpenSC through apt when they are missing,
#   2. cargo fmt --check and clippy (-D warnings, all targets, all features),
#   3. builds the binaries the end-to-end tests start (both server flavours) into target/e2e/,
#      and Kryoptic, a second PKCS#11 implementation (scripts/build-kryoptic.sh),
#   4. runs every test: default features (incl. the KMS against SoftHSM and the end-to-end
#      tests), then the server's tests again with the dev-only embedded provider,
#   5. runs the KMS's token conformance suites again on Kryoptic
#      (PROGRESSDB_TEST_TOKEN=kryoptic),
#   6. runs the conformance suites once more on each token with the KMS in
#      hsm.dek_residency = "hsm" (PROGRESSDB_TEST_RESIDENCY=hsm).
# Every integration test makes its own token in a temp dir (SOFTHSM2_CONF / KRYOPTIC_CONF per
# test), so nothing here touches a system token directory.
set -euo pipefail
cd "$(dirname "$0")/.."

# Each step says when it starts (seconds since the run began), so a slow step shows.
log() { printf '\n==> [%4ds] %s\n' "$SECONDS" "$*"; }

bash scripts/ensure-deps.sh

export CARGO_TERM_COLOR=never
export RUST_BACKTRACE=1
# The soak test's length in CI (tests/tests/e2e_soak.rs; set it higher for a longer soak).
export PROGRESSDB_SOAK_SECS=${PROGRESSDB_SOAK_SECS:-10}
# A one-off run gains nothing from incremental state, which is most of a debug target dir.
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
# Line tables are all a failing test's backtrace needs; full debug info makes every one of
# the ~50 test binaries slower to build and link.
export CARGO_PROFILE_DEV_DEBUG=${CARGO_PROFILE_DEV_DEBUG:-line-tables-only}

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy (all targets, all features, -D warnings)"
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings

log "building binaries for the end-to-end tests"
TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
mkdir -p "$TARGET_DIR/e2e"
cargo build --locked -p progressdb-kms -p progressdb --bins
cp "$TARGET_DIR/debug/progressdb-kms" "$TARGET_DIR/e2e/progressdb-kms"
cp "$TARGET_DIR/debug/progressdb" "$TARGET_DIR/e2e/progressdb"
cargo build --locked -p progressdb --bins --features dev-embedded
cp "$TARGET_DIR/debug/progressdb" "$TARGET_DIR/e2e/progressdb-dev"
export E2E_BIN_DIR="$TARGET_DIR/e2e"

# The second PKCS#11 implementation (and its release as published, which the token-defect
# test needs in the default run below). (Built beside the binaries it took longer in all: both
# builds fill the two cores.)
log "building Kryoptic (the second PKCS#11 implementation)"
bash scripts/build-kryoptic.sh

RESULTS=$(mktemp)
trap 'rm -f "$RESULTS"' EXIT

log "cargo test --workspace (default features)"
cargo test --workspace --locked --no-fail-fast 2>&1 | tee -a "$RESULTS"

log "cargo test -p progressdb --features dev-embedded"
cargo test -p progressdb --features dev-embedded --locked --no-fail-fast 2>&1 | tee -a "$RESULTS"

# The suites that exercise the token: the PKCS#11 backend, start-up, the key API over both
# transports, and the end-to-end flows, lifecycle, CLI, secrets, tampering, DEK rotation and
# the OpenAPI contract; session loss (hsm_recovery) and the planted KEK. (Fault injection by
# moving SoftHSM's token directory away, the rest of e2e_hsm, is SoftHSM's: Kryoptic keeps its
# database open; the memory scan of e2e_residency is SoftHSM's: Kryoptic keeps object values
# in the clear in the KMS's own memory, docs/kms.md. The PostgreSQL and replica suites do not
# depend on the token. The 10,000-DEK rotation under live traffic is a load test of the
# lifecycle engine, run on SoftHSM; on Kryoptic a rotation of 3,000 DEKs killed at every
# stage covers the token's part.)
log "cargo test: the token conformance suites on Kryoptic"
PROGRESSDB_TEST_TOKEN=kryoptic cargo test --locked --no-fail-fast \
  -p progressdb-kms --test hsm_backend --test hsm_resident --test hsm_recovery --test kms_startup \
  --test kms_api --test kms_transport \
  -p progressdb-e2e --test e2e_flow --test e2e_lifecycle --test e2e_cli --test e2e_secrets \
  --test e2e_tamper --test e2e_dek_rotation -- --skip kek_rotation_over_10000_deks \
  2>&1 | tee -a "$RESULTS"
# (The same two packages as above: cargo unifies features per package set, so selecting the
# end-to-end crate alone would rebuild part of the tree.)
PROGRESSDB_TEST_TOKEN=kryoptic cargo test --locked --no-fail-fast -p progressdb-kms -p progressdb-e2e \
  --test e2e_residency a_deployment_switches 2>&1 | tee -a "$RESULTS"
PROGRESSDB_TEST_TOKEN=kryoptic cargo test --locked --no-fail-fast -p progressdb-kms -p progressdb-e2e \
  --test e2e_hsm a_planted_kek 2>&1 | tee -a "$RESULTS"

# The suites whose calls reach the HSM's key and message paths, with the KMS in
# hsm.dek_residency = "hsm" (DEKs only as HSM session objects; hsm_backend is the memory
# path's own suite, hsm_resident, in the default run on both tokens, the hsm path's). The
# contract and CLI suites do not depend on the residency; rotation and rewrap in hsm residency
# are hsm_resident's and e2e_residency's (a rotation across a residency switch).
for token in softhsm kryoptic; do
  log "cargo test: the key-path suites in hsm residency on $token"
  PROGRESSDB_TEST_TOKEN=$token PROGRESSDB_TEST_RESIDENCY=hsm cargo test --locked --no-fail-fast \
    -p progressdb-kms --test kms_api --test kms_transport \
    -p progressdb-e2e --test e2e_flow --test e2e_tamper --test e2e_dek_rotation 2>&1 | tee -a "$RESULTS"
done
log "done"

# One closing line for the whole run (cargo's last line is a doc-test summary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "\n==> all checks and tests passed\ntests: %d passed, %d failed\n", p, f }' "$RESULTS"
