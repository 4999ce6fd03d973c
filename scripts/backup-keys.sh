#!/usr/bin/env bash
# Backs up every key record of the running KMS (wrapped DEKs and metadata, tombstones
# included) to FILE (mode 0600, replaced atomically), in a versioned file protected by an
# HMAC made in the HSM, then verifies every DEK. The file is useless without the HSM token:
# back the token up too (docs/operations.md §7).
#
#   scripts/backup-keys.sh FILE               KMS_CONFIG=... KMS_BIN=... (see scripts/lib/kms-admin.sh)
#
# Restore: progressdb-kms restore --in FILE --config ... (never overwrites; destroyed keys stay
# destroyed unless named with --resurrect KEY_ID).
source "$(dirname "$0")/lib/kms-admin.sh"
[ $# -eq 1 ] || { echo "usage: $0 FILE" >&2; exit 2; }
kms backup --out "$1"
kms verify
