#!/usr/bin/env bash
# Rotates one thread's DEK on a running progressdb server: a new DEK for new posts at once,
# every message re-encrypted by a background job, verified, then the old DEK destroyed in the
# KMS. Posts and edits keep working. Waits for the job, printing its progress; exit 0 when it
# succeeded, 1 when it failed. A second run while one is going follows the running job.
#
#   scripts/rotate-thread-dek.sh THREAD_ID [--encrypt]
#
#   PROGRESSDB_URL        the server (default http://127.0.0.1:8080)
#   PROGRESSDB_ADMIN_KEY  an admin API key, or PROGRESSDB_KEYS_FILE (the server's auth.keys_file;
#                         the first admin key is used; default .dev/keys.toml in dev)
#
# --encrypt: encrypt a thread stored with encryption off in place instead (then, to drop the
# old plain records from LMDB's free pages: stop the server, `progressdb compact --config FILE`).
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 THREAD_ID [--encrypt]" >&2; exit 2; }
THREAD=$1
ACTION=rotate-dek
[ "${2:-}" = "--encrypt" ] && ACTION=encrypt
URL=${PROGRESSDB_URL:-http://127.0.0.1:8080}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${PROGRESSDB_ADMIN_KEY:-}" ]; then
    KEYS=${PROGRESSDB_KEYS_FILE:-$ROOT/.dev/keys.toml}
    [ -r "$KEYS" ] || { echo "set PROGRESSDB_ADMIN_KEY or PROGRESSDB_KEYS_FILE" >&2; exit 2; }
    PROGRESSDB_ADMIN_KEY=$(python3 -c 'import sys,tomllib; print(tomllib.load(open(sys.argv[1],"rb"))["admin"][0])' "$KEYS")
fi
# The key goes to curl through a file descriptor, never on a command line.
auth() { printf 'header = "Authorization: Bearer %s"\n' "$PROGRESSDB_ADMIN_KEY"; }
field() { python3 -c 'import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1], {}, {"d": d}))' "$1"; }

answer=$(curl -sS -K <(auth) -X POST "$URL/admin/threads/$THREAD/$ACTION")
job=$(printf '%s' "$answer" | field 'd.get("job_id") or ""') || true
if [ -z "$job" ]; then echo "refused: $answer" >&2; exit 1; fi
started=$(printf '%s' "$answer" | field 'd["started"]')
echo "job $job ($ACTION of thread $THREAD; started: $started)"
while :; do
    j=$(curl -sS -K <(auth) "$URL/admin/jobs/$job")
    state=$(printf '%s' "$j" | field 'd["state"]')
    printf '%s\n' "$(printf '%s' "$j" | field '"%s: %d/%d migrated, %d verified, %d unreadable, %d conflicts" % (d["state"], d["progress"]["migrated"], d["progress"]["total"], d["progress"]["verified"], d["progress"]["unreadable"], d["progress"]["conflicts"])')"
    case $state in
        succeeded) exit 0 ;;
        failed) echo "failed: $(printf '%s' "$j" | field 'd.get("error")')" >&2; exit 1 ;;
    esac
    sleep 2
done
