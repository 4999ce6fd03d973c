#!/usr/bin/env bash
# Rotates the KEK of the running KMS: a new KEK version in the HSM, every DEK rewrapped to it
# in the background, all verified, then the old version retired. Waits with a progress bar;
# a second run while one is going returns the running job. Exit 0 when the job succeeded.
#
#   scripts/rotate-kek.sh [--no-wait]          KMS_CONFIG=... KMS_BIN=... (see scripts/lib/kms-admin.sh)
#
# Before: back up the HSM token and the key store (docs/operations.md §7).
# After:  scripts/verify-keys.sh; later `progressdb-kms kek destroy --version <old>`.
source "$(dirname "$0")/lib/kms-admin.sh"
kms status
kms rotate-kek "$@"
kms status
