#!/usr/bin/env bash
# Runs the whole system locally and shows it working.
#
#   scripts/dev.sh                  # external mode: SoftHSM token + KEK, progressdb-kms on a Unix
#                                   # socket, progressdb on 127.0.0.1:${PORT:-8080}; demo; then
#                                   # keeps running until Ctrl-C and stops what it started
#   scripts/dev.sh --embedded       # embedded mode: a dev build of progressdb with the in-process
#                                   # key provider and a software master key (.dev/master.key);
#                                   # no HSM, no KMS process. For local work only.
#   scripts/dev.sh --demo [...]     # run the demo, then stop (--demo-only is the same)
#
# Everything lives under .dev/ (git-ignored): token, PIN files, master key, configs, LMDB stores,
# logs, binaries. Re-running reuses them (the same token, KEK, master key and data).
#
# Environment: PORT (server port, default 8080); PROGRESSDB_DEV_BIN_DIR (a directory holding
# already built progressdb-kms, progressdb and progressdb-dev binaries: nothing is built).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEV=$ROOT/.dev
PORT=${PORT:-8080}
MODE=external
DEMO_ONLY=0

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }
for arg in "$@"; do
  case "$arg" in
    --embedded) MODE=embedded ;;
    --external) MODE=external ;;
    --demo | --demo-only) DEMO_ONLY=1 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "dev.sh: unknown option '$arg' (try --help)" >&2; exit 2 ;;
  esac
done

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
die() { echo "dev.sh: $*" >&2; exit 1; }

mkdir -p "$DEV/bin"
chmod 700 "$DEV"

# --- binaries -------------------------------------------------------------------------------
if [ -n "${PROGRESSDB_DEV_BIN_DIR:-}" ]; then
  BIN=$PROGRESSDB_DEV_BIN_DIR
  say "using prebuilt binaries from $BIN"
else
  BIN=$DEV/bin
  TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
  if [ "$MODE" = external ]; then
    say "building progressdb-kms and progressdb"
    cargo build -q -p progressdb-kms -p progressdb --bins
    cp -f "$TARGET/debug/progressdb-kms" "$TARGET/debug/progressdb" "$BIN/"
  else
    say "building progressdb with the dev-only embedded provider (--features dev-embedded)"
    cargo build -q -p progressdb --bins --features dev-embedded
    cp -f "$TARGET/debug/progressdb" "$BIN/progressdb-dev"
  fi
fi
KMS_BIN=$BIN/progressdb-kms
if [ "$MODE" = external ]; then SERVER_BIN=$BIN/progressdb; else SERVER_BIN=$BIN/progressdb-dev; fi
[ -x "$SERVER_BIN" ] || die "no server binary at $SERVER_BIN"
[ "$MODE" = embedded ] || [ -x "$KMS_BIN" ] || die "no KMS binary at $KMS_BIN"

# --- API keys (both modes) ------------------------------------------------------------------
rnd() { head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
KEYS=$DEV/keys.toml
if [ ! -f "$KEYS" ]; then
  (umask 077 && cat >"$KEYS" <<TOML
admin = ["adm_$(rnd)"]
backend = ["be_$(rnd)"]
frontend = ["fe_$(rnd)"]
signing_secret = "$(rnd)"
TOML
  )
fi
chmod 600 "$KEYS"
key_of() { sed -n "s/^$1 = \[\"\(.*\)\"\]/\1/p" "$KEYS"; }
ADMIN=$(key_of admin)
BACKEND=$(key_of backend)
FRONTEND=$(key_of frontend)

PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- key provider ---------------------------------------------------------------------------
if [ "$MODE" = external ]; then
  bash scripts/ensure-deps.sh
  say "provisioning the SoftHSM token and KEK (softhsm-setup/setup.sh)"
  PROGRESSDB_KMS_BIN=$KMS_BIN bash softhsm-setup/setup.sh "$DEV/softhsm"
  export SOFTHSM2_CONF=$DEV/softhsm/softhsm2.conf
  # setup.sh wrote the KMS config for this token (listen.unix, hsm.*, store.path).
  KMS_CONF=$DEV/softhsm/kms.toml
  KMS_SOCK=$(sed -n 's/^unix = "\(.*\)"$/\1/p' "$KMS_CONF")
  [ -n "$KMS_SOCK" ] || die "no listen.unix in $KMS_CONF"
  STORE=$DEV/server-store
  SERVER_CONF=$DEV/server.toml
  KMS_SECTION="mode = \"external\"
endpoint = \"unix://$KMS_SOCK\""
else
  command -v curl >/dev/null || bash scripts/ensure-deps.sh
  MASTER=$DEV/master.key
  if [ -f "$MASTER" ]; then
    say "reusing the dev master key .dev/master.key"
  else
    (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$MASTER.tmp.$$" \
      && mv -f "$MASTER.tmp.$$" "$MASTER")
    say "created the dev master key .dev/master.key (32 random bytes, hex, mode 0600)"
  fi
  chmod 600 "$MASTER"
  STORE=$DEV/server-store-embedded
  SERVER_CONF=$DEV/server-embedded.toml
  KMS_SECTION="mode = \"embedded\"
master_key_file = \"$MASTER\""
fi
mkdir -p "$STORE"

cat >"$SERVER_CONF" <<TOML
# Written by scripts/dev.sh ($MODE mode); regenerated on every run.
[http]
listen = "127.0.0.1:$PORT"

[store]
path = "$STORE"

[auth]
keys_file = "$KEYS"
require_expiring_signatures = true

[encryption]
enabled = true

[kms]
$KMS_SECTION
TOML

# --- start ----------------------------------------------------------------------------------
if [ "$MODE" = external ]; then
  say "starting progressdb-kms (log: .dev/kms.log)"
  "$KMS_BIN" serve --config "$KMS_CONF" >>"$DEV/kms.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 1 100); do [ -S "$KMS_SOCK" ] && break; sleep 0.1; done
  [ -S "$KMS_SOCK" ] || { tail -20 "$DEV/kms.log"; die "the KMS did not start"; }
fi

LOG=$DEV/server.log
[ "$MODE" = embedded ] && LOG=$DEV/server-embedded.log
say "starting progressdb ($MODE mode) on 127.0.0.1:$PORT (log: ${LOG#"$ROOT"/})"
"$SERVER_BIN" serve --config "$SERVER_CONF" >>"$LOG" 2>&1 &
PIDS+=($!)
BASE=http://127.0.0.1:$PORT
for _ in $(seq 1 150); do curl -fs "$BASE/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
curl -fs "$BASE/readyz" >/dev/null || { tail -20 "$LOG"; die "the server is not ready"; }

# --- demo -----------------------------------------------------------------------------------
show() { echo "\$ $*" | sed -E 's/Bearer [A-Za-z0-9_]+/Bearer …/; s/Signature: [0-9a-f]+/Signature: …/'; "$@"; echo; }
json_field() { sed -n "s/.*\"$1\":\"\([^\"]*\)\".*/\1/p"; }

say "demo: a backend obtains a signature for user alice"
SIG=$(curl -fs -X POST "$BASE/v1/sign" -H "Authorization: Bearer $BACKEND" \
  -H 'Content-Type: application/json' -d '{"user_id":"alice"}' | json_field signature)
[ -n "$SIG" ] || die "no signature from /v1/sign"
echo "signature for alice: ${SIG:0:16}…"
AUTH=(-H "Authorization: Bearer $FRONTEND" -H "X-User-ID: alice" -H "X-User-Signature: $SIG" -H 'Content-Type: application/json')

if [ "$MODE" = external ]; then
  say "demo: alice creates a thread (the server asks the KMS for the thread's DEK first)"
else
  say "demo: alice creates a thread (the embedded provider makes its DEK in-process)"
fi
THREAD=$(curl -fs -X POST "$BASE/v1/threads" "${AUTH[@]}" -d '{"title":"hello HSM"}')
echo "$THREAD"
TID=$(echo "$THREAD" | json_field id)
[ -n "$TID" ] || die "no thread id in the answer"

say "demo: alice posts two messages (encrypted under the thread's DEK)"
show curl -fs -X POST "$BASE/v1/threads/$TID/messages" "${AUTH[@]}" -d '{"body":{"text":"top secret demo message one"}}'
show curl -fs -X POST "$BASE/v1/threads/$TID/messages" "${AUTH[@]}" -d '{"body":{"text":"top secret demo message two"}}'

say "demo: alice reads them back (one batch decrypt)"
show curl -fs "$BASE/v1/threads/$TID/messages?order=asc" "${AUTH[@]}"

say "demo: an admin sees the thread's KMS metadata (the wrapped DEK, never a raw key)"
show curl -fs "$BASE/admin/threads/$TID/kms" -H "Authorization: Bearer $ADMIN"

say "demo: the server's LMDB holds no plaintext"
if grep -rqa "top secret demo message" "$STORE"; then
  die "PLAINTEXT FOUND in $STORE"
else
  echo "grep -ra 'top secret demo message' ${STORE#"$ROOT"/}: no match"
fi

# --- where things are -----------------------------------------------------------------------
say "endpoints ($MODE mode)"
echo "  API:        $BASE  (health: $BASE/healthz, readiness: $BASE/readyz)"
if [ "$MODE" = external ]; then
  echo "  KMS:        unix://$KMS_SOCK  (admin: ${KMS_SOCK%.sock}.admin.sock)"
  echo "  KMS status: $KMS_BIN status --config $KMS_CONF"
else
  echo "  KMS:        none (embedded provider, master key .dev/master.key; dev builds only)"
fi
echo "  dev API keys (.dev/keys.toml):"
echo "    admin    = $ADMIN"
echo "    backend  = $BACKEND"
echo "    frontend = $FRONTEND  (needs X-User-ID and X-User-Signature)"
echo "  try:"
echo "    curl -s $BASE/v1/threads -H 'Authorization: Bearer $BACKEND' -H 'X-User-ID: alice'"

if [ "$DEMO_ONLY" = 1 ]; then
  say "demo done ($MODE mode); stopping"
  exit 0
fi
say "running; Ctrl-C stops everything dev.sh started"
wait
