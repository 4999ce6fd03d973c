#!/usr/bin/env bash
# Runs every check and every test of the workspace, on a fresh machine too:
#   1. installs SoftHSM2 and OpenSC through apt when they are missing,
#   2. cargo fmt --check,
#   3. builds, with clippy's lints (-D warnings, all targets, all features), the binaries the
#      end-to-end tests start (both server flavours) into target/e2e/,
#      and Kryoptic, a second PKCS#11 implementation (scripts/build-kryoptic.sh), while the
#      Python environments of the ProgressDB SDK and fuzz tests install (package registry),
#   4. runs every test with cargo-nextest (.config/nextest.toml): default features (incl. the
#      KMS against SoftHSM and the end-to-end tests), then the server's tests again with the
#      dev-only embedded provider,
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

# The Python environments two end-to-end tests use (ProgressDB's published SDK; schemathesis
# for the fuzz of the ProgressDB paths), installed from the package registry while the builds
# below run (at the lowest priority: in their idle moments), so the tests do not wait for
# them. Each test makes its own if this failed.
PREFETCH_LOG=$(mktemp)
nice -n 19 bash -c '
  set -e
  bash scripts/sdk-venv.sh target/sdk-venv >/dev/null
  [ -x target/fuzz-venv/bin/st ] || {
    python3 -m venv target/fuzz-venv && target/fuzz-venv/bin/pip install -q --no-compile schemathesis
  }
' >"$PREFETCH_LOG" 2>&1 &
PREFETCH=$!

export CARGO_TERM_COLOR=never
export RUST_BACKTRACE=1
# The soak test's length in CI (tests/tests/e2e_soak.rs; set it higher for a longer soak).
export PROGRESSDB_SOAK_SECS=${PROGRESSDB_SOAK_SECS:-10}
# A one-off run gains nothing from incremental state, which is most of a debug target dir.
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
# Line tables are all a failing test's backtrace needs; full debug info makes every one of
# the ~50 test binaries slower to build and link.
export CARGO_PROFILE_DEV_DEBUG=${CARGO_PROFILE_DEV_DEBUG:-line-tables-only}
# mold (scripts/ensure-deps.sh) links the ~60 test binaries in a fraction of ld's time.
export RUSTFLAGS="${RUSTFLAGS:-} -C link-arg=-fuse-ld=mold"

log "cargo fmt --check"
cargo fmt --all -- --check

# Clippy runs inside the builds below instead of in a `cargo clippy` of its own, which would
# check every dependency a second time: clippy-driver is rustc plus clippy's lints, and as
# cargo's workspace wrapper it compiles (and lints) the workspace's crates, the dependencies
# being compiled by plain rustc. The two builds together are `--all-targets --all-features`
# (the workspace has no benches or examples; its one optional feature is the server's
# dev-embedded, built on its own below), and -D warnings makes any lint fail the build.
# Every cargo command below runs with the same settings, so none rebuilds anything.
RUSTC_WORKSPACE_WRAPPER=$(rustup which clippy-driver 2>/dev/null || command -v clippy-driver)
export RUSTC_WORKSPACE_WRAPPER
PLAIN_RUSTFLAGS=$RUSTFLAGS
export RUSTFLAGS="$RUSTFLAGS -D warnings"

# Every build below selects the whole workspace where it can: cargo unifies dependency
# features per selection, so the binaries and the test binaries then share one build of every
# dependency instead of two.
TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
mkdir -p "$TARGET_DIR/e2e"
# The server with the dev-only embedded provider, built as its own test run builds it below
# (so that run compiles nothing more).
log "building the server with the dev-only embedded provider"
cargo test --locked -p progressdb --features dev-embedded --no-run
cp "$TARGET_DIR/debug/progressdb" "$TARGET_DIR/e2e/progressdb-dev"

# The second PKCS#11 implementation (and its release as published, which the token-defect
# test needs in the default run below). (Built beside the binaries it took longer in all: both
# builds fill the two cores.)
log "building Kryoptic (the second PKCS#11 implementation)"
# (Kryoptic is not ours to lint: plain rustc, our warnings settings left out.)
env -u RUSTC_WORKSPACE_WRAPPER RUSTFLAGS="$PLAIN_RUSTFLAGS" bash scripts/build-kryoptic.sh

# The test binaries, and with them the binaries the end-to-end tests start (cargo builds a
# package's binaries for its integration tests): no separate `cargo build` of them.
log "building the test binaries and the binaries"
cargo nextest run --workspace --locked --no-run
cp "$TARGET_DIR/debug/progressdb-kms" "$TARGET_DIR/e2e/progressdb-kms"
cp "$TARGET_DIR/debug/progressdb" "$TARGET_DIR/e2e/progressdb"
export E2E_BIN_DIR="$TARGET_DIR/e2e"
wait "$PREFETCH" || { echo "(preparing the Python environments failed; the tests make their own)"; cat "$PREFETCH_LOG"; }

RESULTS=$(mktemp)
trap 'rm -f "$RESULTS"' EXIT
# cargo-nextest (.config/nextest.toml): one queue of tests across all test binaries, each test
# in a process of its own, no retries. Its closing "Summary" line of each pass is counted below.
# After each pass, its five slowest tests (nextest's JUnit report, .config/nextest.toml).
nt() {
  local rc=0
  cargo nextest run --locked --no-fail-fast "$@" 2>&1 | tee -a "$RESULTS" || rc=$?
  python3 - "$TARGET_DIR/nextest/default/junit.xml" <<'PY' || true
import sys, xml.etree.ElementTree as ET
cases = sorted(((float(c.get("time", 0)), c.get("classname"), c.get("name"))
                for c in ET.parse(sys.argv[1]).iter("testcase")), reverse=True)
print("     slowest: " + "; ".join(f"{n} ({t:.1f} s)" for t, _, n in cases[:5]))
PY
  return $rc
}

log "tests: the whole workspace (default features)"
nt --workspace
# nextest runs no doc-tests; cargo does.
cargo test --workspace --locked --doc 2>&1 | tee -a "$RESULTS"

log "tests: the server with the dev-only embedded provider"
nt -p progressdb --features dev-embedded

# The suites that exercise the token: the PKCS#11 backend, start-up, the key API over both
# transports, and the end-to-end flows, lifecycle, CLI, secrets, tampering, DEK rotation and
# the OpenAPI contract; session loss (hsm_recovery) and the planted KEK. (Fault injection by
# moving SoftHSM's token directory away, the rest of e2e_hsm, is SoftHSM's: Kryoptic keeps its
# database open; the memory scan of e2e_residency is SoftHSM's: Kryoptic keeps object values
# in the clear in the KMS's own memory, docs/kms.md. The PostgreSQL and replica suites do not
# depend on the token. The 10,000-DEK rotation under live traffic is a load test of the
# lifecycle engine, run on SoftHSM; on Kryoptic a rotation of 3,000 DEKs killed at every
# stage covers the token's part.) The same selection as the default pass (--workspace), so
# nothing is rebuilt.
log "tests: the token conformance suites on Kryoptic"
PROGRESSDB_TEST_TOKEN=kryoptic nt --workspace -E '
    binary(hsm_backend) | binary(hsm_resident) | binary(hsm_recovery) | binary(kms_startup)
  | binary_id(progressdb-kms::kms_api) | binary(kms_transport)
  | (binary(e2e_flow) | binary(e2e_lifecycle) | binary(e2e_cli) | binary(e2e_secrets)
     | binary(e2e_tamper) | binary(e2e_dek_rotation)) - test(kek_rotation_over_10000_deks)
  | (binary(e2e_residency) & test(a_deployment_switches))
  | (binary(e2e_hsm) & test(a_planted_kek))'

# The suites whose calls reach the HSM's key and message paths, with the KMS in
# hsm.dek_residency = "hsm" (DEKs only as HSM session objects; hsm_backend is the memory
# path's own suite, hsm_resident, in the default run on both tokens, the hsm path's). The
# contract and CLI suites do not depend on the residency; rotation and rewrap in hsm residency
# are hsm_resident's and e2e_residency's (a rotation across a residency switch).
for token in softhsm kryoptic; do
  log "tests: the key-path suites in hsm residency on $token"
  PROGRESSDB_TEST_TOKEN=$token PROGRESSDB_TEST_RESIDENCY=hsm nt --workspace -E '
      binary_id(progressdb-kms::kms_api) | binary(kms_transport) | binary(e2e_flow) | binary(e2e_tamper)
    | binary(e2e_dek_rotation)'
done
log "done"

# One closing line for the whole run: nextest's "Summary" line of each pass, and cargo's
# doc-test results.
awk '/^ *Summary \[/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     /^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "\n==> all checks and tests passed\ntests: %d passed, %d failed\n", p, f }' "$RESULTS"
