#!/usr/bin/env bash
# Unwraps every active DEK of the running KMS under its KEK through the HSM and prints DEKs per
# KEK version; exit 1 (and the failing key ids) when any does not unwrap. Changes nothing.
# Then checks the audit log's HMAC chain.
#
#   scripts/verify-keys.sh                     KMS_CONFIG=... KMS_BIN=... (see scripts/lib/kms-admin.sh)
source "$(dirname "$0")/lib/kms-admin.sh"
kms verify "$@"
kms audit verify
