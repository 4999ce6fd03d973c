#!/usr/bin/env bash
# Rebuilds lost KMS key records from the server's copies of its threads' keys: fetches them
# from the running server (GET /admin/kms/key-copies, admin key), then imports them into the
# running KMS (progressdb-kms import-copies, admin socket). Each copy must unwrap in the HSM;
# destroyed keys are never brought back; the threads it could not recover are listed.
#
#   scripts/rebuild-kms-store.sh     PROGRESSDB_URL, PROGRESSDB_ADMIN_KEY (server),
#                                    KMS_CONFIG, KMS_BIN (see scripts/lib/kms-admin.sh)
source "$(dirname "$0")/lib/kms-admin.sh"
URL=${PROGRESSDB_URL:-http://127.0.0.1:8080}
[ -n "${PROGRESSDB_ADMIN_KEY:-}" ] || { echo "set PROGRESSDB_ADMIN_KEY (a server admin key)" >&2; exit 2; }
copies=$(mktemp)
trap 'rm -f "$copies"' EXIT
chmod 600 "$copies"
curl -sSf -K <(printf 'header = "Authorization: Bearer %s"\n' "$PROGRESSDB_ADMIN_KEY") \
    "$URL/admin/kms/key-copies" >"$copies"
kms import-copies --in "$copies"
