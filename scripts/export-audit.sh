#!/usr/bin/env bash
# Appends the running KMS's audit entries that FILE does not hold yet to FILE (JSON lines, as
# `progressdb-kms audit list` prints them). Run it after every backup and often in between
# (cron), and keep FILE off the host with the backups: a restore into a store that lost its
# tombstones reads the keys destroyed after the backup from it (`restore --audit FILE`,
# docs/operations.md). Start a new FILE after a store is restored (its log starts afresh).
#
#   scripts/export-audit.sh FILE              KMS_CONFIG=... KMS_BIN=... (see scripts/lib/kms-admin.sh)
source "$(dirname "$0")/lib/kms-admin.sh"
[ $# -eq 1 ] || { echo "usage: $0 FILE" >&2; exit 2; }
last=0
if [ -s "$1" ]; then
    last=$(tail -n 1 "$1" | sed -n 's/^{"seq":\([0-9][0-9]*\),.*/\1/p')
    [ -n "$last" ] || { echo "$1: its last line is not an audit entry" >&2; exit 1; }
fi
new=$(mktemp "$1.XXXXXX")
trap 'rm -f "$new"' EXIT
kms audit list --after "$last" --limit 1000000000 > "$new"
cat "$new" >> "$1"
echo "audit entries after $last appended to $1: $(wc -l < "$new")"
