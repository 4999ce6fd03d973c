#!/usr/bin/env bash
# Backs up every key record of the running KMS (wrapped DEKs and metadata, tombstones
# included) to FILE (mode 0600, replaced atomically), in a versioned file protected by an
# HMAC made in the HSM, then verifies every DEK. The file is useless without the HSM token:
# back the token up too (docs/operations.md §7).
#
#   scripts/backup-keys.sh FILE               KMS_CONFIG=... KMS_BIN=... (see scripts/lib/kms-admin.sh)
#
# Then appends the audit log since the last export to FILE.audit.jsonl (scripts/export-audit.sh):
# keep both off the host.
#
# Restore: progressdb-kms restore --in FILE --audit FILE.audit.jsonl --config ... (never
# overwrites; destroyed keys stay destroyed unless named with --resurrect KEY_ID, including
# keys destroyed after the backup).
source "$(dirname "$0")/lib/kms-admin.sh"
[ $# -eq 1 ] || { echo "usage: $0 FILE" >&2; exit 2; }
kms backup --out "$1"
kms verify
bash "$(dirname "$0")/export-audit.sh" "$1.audit.jsonl"
