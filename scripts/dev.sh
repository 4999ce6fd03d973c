#!/usr/bin/env bash
# Runs the whole system locally: SoftHSM token + KEK, progressdb-kms on a Unix socket,
# progressdb on 127.0.0.1:${PORT:-8080}, then a short demo flow with curl.
#
#   scripts/dev.sh              # demo, then keep both processes running until Ctrl-C
#   scripts/dev.sh --demo-only  # demo, then stop
#
# Everything lives under .dev/ (git-ignored): token, PIN files, configs, LMDB stores, logs.
# Re-running reuses them.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEV=$ROOT/.dev
PORT=${PORT:-8080}
DEMO_ONLY=0
[ "${1:-}" = "--demo-only" ] && DEMO_ONLY=1

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

bash scripts/ensure-deps.sh
say "building progressdb-kms and progressdb"
cargo build -q -p progressdb-kms -p progressdb --bins
KMS_BIN=$ROOT/target/debug/progressdb-kms
SERVER_BIN=$ROOT/target/debug/progressdb

mkdir -p "$DEV"
chmod 700 "$DEV"
say "provisioning the SoftHSM token and KEK (softhsm-setup/setup.sh)"
PROGRESSDB_KMS_BIN=$KMS_BIN bash softhsm-setup/setup.sh "$DEV/softhsm"
export SOFTHSM2_CONF=$DEV/softhsm/softhsm2.conf

# setup.sh wrote the KMS config for this token (listen.unix, hsm.*, store.path).
KMS_CONF=$DEV/softhsm/kms.toml
KMS_SOCK=$(sed -n 's/^unix = "\(.*\)"$/\1/p' "$KMS_CONF")
[ -n "$KMS_SOCK" ] || { echo "no listen.unix in $KMS_CONF" >&2; exit 1; }
mkdir -p "$DEV/server-store"

KEYS=$DEV/keys.toml
if [ ! -f "$KEYS" ]; then
  rnd() { head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
  umask 077
  cat > "$KEYS" <<TOML
admin = ["adm_$(rnd)"]
backend = ["be_$(rnd)"]
frontend = ["fe_$(rnd)"]
signing_secret = "$(rnd)"
TOML
  umask 022
fi
chmod 600 "$KEYS"
key_of() { sed -n "s/^$1 = \[\"\(.*\)\"\]/\1/p" "$KEYS"; }
ADMIN=$(key_of admin)
BACKEND=$(key_of backend)
FRONTEND=$(key_of frontend)

cat > "$DEV/server.toml" <<TOML
[http]
listen = "127.0.0.1:$PORT"

[store]
path = "$DEV/server-store"

[auth]
keys_file = "$KEYS"

[encryption]
enabled = true

[kms]
mode = "external"
endpoint = "unix://$KMS_SOCK"
TOML

PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM

say "starting progressdb-kms (log: .dev/kms.log)"
"$KMS_BIN" serve --config "$KMS_CONF" >>"$DEV/kms.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do [ -S "$KMS_SOCK" ] && break; sleep 0.1; done
[ -S "$KMS_SOCK" ] || { tail -20 "$DEV/kms.log"; echo "KMS did not start" >&2; exit 1; }

say "starting progressdb on 127.0.0.1:$PORT (log: .dev/server.log)"
"$SERVER_BIN" serve --config "$DEV/server.toml" >>"$DEV/server.log" 2>&1 &
PIDS+=($!)
BASE=http://127.0.0.1:$PORT
for _ in $(seq 1 100); do curl -fs "$BASE/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
curl -fs "$BASE/readyz" >/dev/null || { tail -20 "$DEV/server.log"; echo "server not ready" >&2; exit 1; }

show() { echo "\$ $*" | sed -E 's/Bearer [A-Za-z0-9_]+/Bearer …/; s/Signature: [0-9a-f]+/Signature: …/'; "$@"; echo; }
json_field() { sed -n "s/.*\"$1\":\"\([^\"]*\)\".*/\1/p"; }

say "demo: a backend obtains a signature for user alice"
SIG=$(curl -fs -X POST "$BASE/v1/sign" -H "Authorization: Bearer $BACKEND" \
  -H 'Content-Type: application/json' -d '{"user_id":"alice"}' | json_field signature)
echo "signature for alice: ${SIG:0:16}…"
AUTH=(-H "Authorization: Bearer $FRONTEND" -H "X-User-ID: alice" -H "X-User-Signature: $SIG" -H 'Content-Type: application/json')

say "demo: alice creates a thread (the server asks the KMS for the thread's DEK first)"
THREAD=$(curl -fs -X POST "$BASE/v1/threads" "${AUTH[@]}" -d '{"title":"hello HSM"}')
echo "$THREAD"
TID=$(echo "$THREAD" | json_field id)

say "demo: alice posts two messages (encrypted by the KMS under the thread's DEK)"
show curl -fs -X POST "$BASE/v1/threads/$TID/messages" "${AUTH[@]}" -d '{"body":{"text":"top secret demo message one"}}'
show curl -fs -X POST "$BASE/v1/threads/$TID/messages" "${AUTH[@]}" -d '{"body":{"text":"top secret demo message two"}}'

say "demo: alice reads them back (one batch decrypt call to the KMS)"
show curl -fs "$BASE/v1/threads/$TID/messages?order=asc" "${AUTH[@]}"

say "demo: an admin sees the thread's KMS metadata (the wrapped DEK, never a raw key)"
show curl -fs "$BASE/admin/threads/$TID/kms" -H "Authorization: Bearer $ADMIN"

say "demo: the server's LMDB holds no plaintext"
if grep -rqa "top secret demo message" "$DEV/server-store"; then
  echo "PLAINTEXT FOUND in $DEV/server-store" >&2; exit 1
else
  echo "grep -ra 'top secret demo message' .dev/server-store: no match"
fi

if [ "$DEMO_ONLY" = 1 ]; then
  say "demo done; stopping"
  exit 0
fi
say "running: API on $BASE, KMS on unix://$KMS_SOCK. Keys in .dev/keys.toml. Ctrl-C stops."
wait
