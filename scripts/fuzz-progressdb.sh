#!/usr/bin/env bash
# Fuzzes the ProgressDB-compatible API (docs/progressdb-compat.md) with schemathesis, driven
# by ProgressDB's own published OpenAPI document (docs/openapi/progressdb-v0.2.0.yaml, a copy
# of ../shared/progressdb-openapi-v0.2.0.yaml), restricted to the paths this server serves:
# /frontend/v1/*, POST /backend/v1/sign, GET /admin/health, GET /admin/stats.
#
#   scripts/fuzz-progressdb.sh          # EXAMPLES=30 per operation, SEED=20240601 (~20 s)
#   EXAMPLES=300 SEED=7 BIN_DIR=/tmp/bin scripts/fuzz-progressdb.sh          # (~2 min)
#
# Environment: BIN_DIR (prebuilt progressdb and progressdb-kms; default target/e2e; nothing is
# ever built), EXAMPLES, SEED, WORKERS (default 1: reproducible), PORT (default 18575), VENV
# (default target/fuzz-venv: schemathesis is pip-installed there when missing), KEEP=1 (keep
# the work directory; it is kept anyway when the run fails).
#
# It provisions a SoftHSM token in a temporary directory (softhsm-setup/setup.sh), starts
# progressdb-kms and progressdb from BIN_DIR, seeds two users' threads and messages through
# the API, and hands the real keys to schemathesis as dictionaries (the document has no
# links, so without them nearly every {threadKey}/{id} request would be a 404). Five runs:
#   main     the frontend operations but the deletes, and /backend/v1/sign, from the document;
#   served   the same frontend operations from a copy of the document without the fields and
#            parameters this server refuses by design (below, "the served subset");
#   admin    GET /admin/health and /admin/stats;
#   delete-messages, delete-threads
#            the two deletes, last, so that the seeded data lives through the other runs.
# Afterwards: mallory's seeded thread and messages must be unchanged (alice's requests must
# not reach them), no panic in either log, every error answer in ProgressDB's {error, code}
# shape (progressdb-compat.md, "Errors"; the document has no error schema, so schemathesis
# cannot check it), and no 5xx in the server's own request counter. Exit status is non-zero
# on any failure; the last line is a summary: requests made (the server's count, checks'
# probes included), schemathesis's unique failures, 5xx answers, wrongly shaped errors.
#
# Auth: the frontend paths and /backend/v1/sign get the backend key as the SDKs send it
# (`Authorization: Bearer`) and also in `X-API-Key` (the document makes that header a
# required parameter; the server refuses two different keys, so an unset, generated
# X-API-Key would turn every request into a 401), plus `X-User-ID: alice`. /admin/* get the
# admin key in `X-API-Key` alone, the document's scheme, so schemathesis's ignored_auth check
# can remove it and see the 401. (On /backend/v1/sign that check does nothing: it cannot
# remove an Authorization header the document does not declare.)
#
# Checks: all of schemathesis's checks, except the ones excluded by name in the config written
# below ("EXCLUSIONS"), each with its reason. CI runs it (EXAMPLES=30, the fixed seed, one
# worker: a run repeats exactly) through tests/tests/e2e_progressdb_fuzz.rs; it needs PyPI
# for the first install.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN_DIR=${BIN_DIR:-target/e2e}
EXAMPLES=${EXAMPLES:-30}
SEED=${SEED:-20240601}
WORKERS=${WORKERS:-1}
PORT=${PORT:-18575}
VENV=${VENV:-target/fuzz-venv}
DOC=$ROOT/docs/openapi/progressdb-v0.2.0.yaml
BASE=http://127.0.0.1:$PORT
T0=$(date +%s)

die() { echo "fuzz-progressdb.sh: $*" >&2; exit 1; }
say() { printf '==> %s\n' "$*"; }

BIN_DIR=$(cd "$BIN_DIR" 2>/dev/null && pwd) || die "no BIN_DIR ${BIN_DIR}"
for b in progressdb progressdb-kms; do
  [ -x "$BIN_DIR/$b" ] \
    || die "no $b in $BIN_DIR (build it first, or set BIN_DIR; this script never builds)"
done
[ -f "$DOC" ] || die "no $DOC"
SHARED=../shared/progressdb-openapi-v0.2.0.yaml
if [ -f "$SHARED" ] && ! cmp -s "$DOC" "$SHARED"; then
  echo "warning: $DOC differs from $SHARED" >&2
fi
! curl -s -o /dev/null "$BASE/" 2>/dev/null \
  || die "something already listens on port $PORT (set PORT)"

# --- tools ----------------------------------------------------------------------------------
missing=()
command -v softhsm2-util >/dev/null || missing+=(softhsm2)
command -v curl >/dev/null || missing+=(curl)
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if [ ! -x "$VENV/bin/st" ]; then
  say "installing schemathesis into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --no-compile schemathesis
fi
ST=$VENV/bin/st
PY=$VENV/bin/python

# --- work directory, processes --------------------------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fuzz-progressdb.XXXXXX")
PIDS=()
status=0
cleanup() {
  local rc=$?
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ "${KEEP:-0}" = 1 ] || [ "$rc" != 0 ] || [ "$status" != 0 ]; then
    echo "work directory kept: $WORK (server.log, kms.log, st-*.log, reports/)"
  else
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT
trap 'status=130; exit 130' INT
trap 'status=143; exit 143' TERM

say "SoftHSM token and KEK in $WORK/softhsm"
PROGRESSDB_KMS_BIN=$BIN_DIR/progressdb-kms bash softhsm-setup/setup.sh "$WORK/softhsm" \
  >"$WORK/setup.log" 2>&1 || { status=1; tail -20 "$WORK/setup.log"; die "softhsm-setup failed"; }
export SOFTHSM2_CONF=$WORK/softhsm/softhsm2.conf
KMS_CONF=$WORK/softhsm/kms.toml
KMS_SOCK=$(sed -n 's/^unix = "\(.*\)"$/\1/p' "$KMS_CONF")

rnd() { head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
KEYS=$WORK/keys.toml
ADMIN=adm_$(rnd)
BACKEND=be_$(rnd)
(umask 077 && cat >"$KEYS" <<TOML
admin = ["$ADMIN"]
backend = ["$BACKEND"]
frontend = ["fe_$(rnd)"]
signing_secret = "$(rnd)"
TOML
)
mkdir -p "$WORK/store"
cat >"$WORK/server.toml" <<TOML
[http]
listen = "127.0.0.1:$PORT"

[store]
path = "$WORK/store"

[auth]
keys_file = "$KEYS"
require_expiring_signatures = true

[encryption]
enabled = true

[kms]
mode = "external"
endpoint = "unix://$KMS_SOCK"
TOML

say "starting progressdb-kms and progressdb ($BIN_DIR) on $BASE"
"$BIN_DIR/progressdb-kms" serve --config "$KMS_CONF" >"$WORK/kms.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do [ -S "$KMS_SOCK" ] && break; sleep 0.1; done
[ -S "$KMS_SOCK" ] || { status=1; tail -20 "$WORK/kms.log"; die "the KMS did not start"; }
"$BIN_DIR/progressdb" serve --config "$WORK/server.toml" >"$WORK/server.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 150); do curl -fs "$BASE/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
curl -fs "$BASE/readyz" >/dev/null \
  || { status=1; tail -20 "$WORK/server.log"; die "the server is not ready"; }

# --- seed data ------------------------------------------------------------------------------
# As user $1 (the backend key acting for it): METHOD PATH [JSON]; prints the answer's "key".
api_key() {
  local user=$1 method=$2 path=$3 body=${4:-}
  curl -fsS -X "$method" "$BASE$path" -H "Authorization: Bearer $BACKEND" -H "X-User-ID: $user" \
    -H 'Content-Type: application/json' ${body:+-d "$body"} \
    | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["key"])'
}
THREADS=() MESSAGES=()
seed_user() {
  local user=$1 n=$2 t i body
  for i in $(seq 1 "$n"); do
    t=$(api_key "$user" POST /frontend/v1/threads "{\"title\":\"seed $user $i\"}")
    THREADS+=("$t")
    for body in '{"text":"seed one"}' '"seed two"' '[1,2,3]'; do
      MESSAGES+=("$(api_key "$user" POST "/frontend/v1/threads/$t/messages" "{\"body\":$body}")")
    done
  done
}
say "seeding: 3 threads of alice (the fuzzed user) and 1 of mallory, 3 messages each"
seed_user alice 3
seed_user mallory 1
MALLORY_THREAD=${THREADS[3]}
snapshot_mallory() {
  curl -fsS "$BASE/frontend/v1/threads/$MALLORY_THREAD/messages" -H "X-API-Key: $BACKEND" \
    -H "X-User-ID: mallory" | "$PY" -c '
import json, sys
d = json.load(sys.stdin)
print(json.dumps([[m["key"], m.get("body"), m["updated_ts"]] for m in d["messages"]]))'
  curl -fsS "$BASE/frontend/v1/threads/$MALLORY_THREAD" -H "X-API-Key: $BACKEND" \
    -H "X-User-ID: mallory"
}
MALLORY_BEFORE=$(snapshot_mallory)

# The server's own count of the requests it answered, and of its 5xx answers (its
# progressdb_http_requests_total counter), as "requests 5xx".
served_counts() {
  curl -fsS "$BASE/metrics" -H "X-API-Key: $ADMIN" | "$PY" -c '
import re, sys
total = errors = 0
for line in sys.stdin:
    m = re.match(r"progressdb_http_requests_total\{(.*)\} (\d+)", line)
    if m:
        total += int(m.group(2))
        errors += int(m.group(2)) if re.search(r"status=\"5\d\d\"", m.group(1)) else 0
print(total, errors)'
}

toml_list() { local s="" v; for v in "$@"; do s+="\"$v\", "; done; echo "[${s%, }]"; }

# --- the served subset of the document -----------------------------------------------------
# A second copy of the document without the request fields that a generator cannot fill with
# a value this server takes (docs/progressdb-compat.md):
#   MessageCreateRequest.id        ignored ("A client's message id is ignored": keys are the
#                                  server's); builds before that refuse it with 400;
#   MessageCreateRequest.reply_to  must be a message key, <20 digits>-<6 digits> ("Shapes";
#                                  builds before reply_to was stored refuse any);
#   Thread{Create,Update}Request.slug  1-128 bytes, no white space or control characters
#                                  ("Shapes"; builds before slugs were stored refuse any).
# schemathesis fills optional properties, so from the whole document nearly every create
# carries one of them and is refused: the success paths (202 on a new message) would hardly
# be reached. From this copy they are, and positive_data_acceptance judges the writes on
# title and body alone. Everything else (query parameters included) is the document's.
SERVED_DOC=$WORK/progressdb-served.yaml
"$PY" - "$DOC" "$SERVED_DOC" <<'PY'
import sys, yaml
doc = yaml.safe_load(open(sys.argv[1]))
schemas = doc["components"]["schemas"]
for name, fields in {
    "MessageCreateRequest": ["id", "reply_to"],
    "ThreadCreateRequest": ["slug"],
    "ThreadUpdateRequest": ["slug"],
}.items():
    for f in fields:
        del schemas[name]["properties"][f]
        schemas[name].get("example", {}).pop(f, None)
yaml.safe_dump(doc, open(sys.argv[2], "w"), sort_keys=False)
PY

# --- schemathesis config --------------------------------------------------------------------
# Two configs: $CONF_SERVED (for the served subset) and $CONF (for the whole document: the
# same, and positive_data_acceptance off on the operations whose refused fields are left in).
CONF=$WORK/st-document.toml
CONF_SERVED=$WORK/st-served.toml
cat >"$CONF_SERVED" <<TOML
# Written by scripts/fuzz-progressdb.sh.
continue-on-failure = true

[cache]
# Nothing written into the repository (schemathesis caches under ./.schemathesis by default).
enabled = false

[generation]
database = "none"

# Real keys: alice's 3 threads (reachable) and mallory's (must be 404 to alice), and their
# messages; cursors take either kind. Each parameter takes a real key with the probability
# given, a generated value otherwise.
[dictionaries.threads]
values = $(toml_list "${THREADS[@]}")

[dictionaries.messages]
values = $(toml_list "${MESSAGES[@]}")

[dictionaries.cursors]
values = $(toml_list "${THREADS[@]}" "${MESSAGES[@]}")

[parameters]
"path.threadKey" = { dictionary = "threads", probability = 0.7 }
"path.id" = { dictionary = "messages", probability = 0.7 }
"query.before" = { dictionary = "cursors", probability = 0.3 }
"query.after" = { dictionary = "cursors", probability = 0.3 }
"query.anchor" = { dictionary = "cursors", probability = 0.3 }

# ---- EXCLUSIONS: every check disabled, by name, and why --------------------------------------
[checks]
# status_code_conformance: the document lists no error status at all (only 200/202/204), so
# every 400/401/403/404/413 this server answers, each in docs/server.md's error table, would
# be an "undocumented status code". The other checks still judge each answer.
status_code_conformance.enabled = false
# missing_required_header: the document makes X-API-Key a required header; this server also
# takes the key in Authorization: Bearer (progressdb-compat.md, "Where the sources disagree",
# row "Key header": Bearer for the Python and Node SDKs, X-API-Key for TypeScript). We send
# both, so a request without X-API-Key still carries the Bearer key and is rightly served.
missing_required_header.enabled = false

# ---- positive_data_acceptance, disabled per operation, by name ------------------------------
# That check sends schema-valid requests and wants no 400. The document's schemas are looser
# than what this server deliberately accepts (docs/progressdb-compat.md):

# "Paging", "Refused with 400 rather than answered wrongly": limit=0 or negative (the
# document's limit is any integer), a cursor (before/after/anchor) that is not a thread key,
# more than one cursor.
[[operations]]
include-name = "GET /frontend/v1/threads"
checks.positive_data_acceptance.enabled = false

# The same for messages: cursors that are not message keys.
[[operations]]
include-name = "GET /frontend/v1/threads/{threadKey}/messages"
checks.positive_data_acceptance.enabled = false

# A user id is 1 to 256 bytes of UTF-8, no control characters or white space at either end
# ("Where the sources disagree", row "Signing user id length"; the document says only string).
[[operations]]
include-name = "POST /backend/v1/sign"
checks.positive_data_acceptance.enabled = false

# Thread titles ("Where the sources disagree", row "Thread title"): a blank title is 400
# (positive_data_acceptance; the document allows any string), and `null` where the document
# says string is taken as absent: no slug on a create, an unchanged title or (`slug: null`)
# a removed slug on an update (negative_data_rejection).
[[operations]]
include-name = "POST /frontend/v1/threads"
checks.positive_data_acceptance.enabled = false
checks.negative_data_rejection.enabled = false

[[operations]]
include-name = "PUT /frontend/v1/threads/{threadKey}"
checks.positive_data_acceptance.enabled = false
checks.negative_data_rejection.enabled = false
TOML
cp "$CONF_SERVED" "$CONF"
cat >>"$CONF" <<TOML

# Whole document only (the served subset leaves these fields out, above): a thread's slug
# is 1-128 bytes without white space or control characters ("Shapes"); the thread operations'
# exclusions above cover it.

# reply_to must be a message key ("Shapes"); builds before reply_to and client ids were
# accepted refuse either with 400.
[[operations]]
include-name = "POST /frontend/v1/threads/{threadKey}/messages"
checks.positive_data_acceptance.enabled = false
TOML

# --- runs -----------------------------------------------------------------------------------
# Separate runs, each with its own headers (-H): schemathesis 4.32 keeps one HTTP session per
# worker, built with the headers of the first operation it tests, so per-operation headers in
# the config would leak from the frontend operations into the admin ones.
mkdir -p "$WORK/reports"
COUNTS_BEFORE=$(served_counts)
run() {
  local name=$1 conf=$2 doc=$3
  shift 3
  say "schemathesis: $name (max $EXAMPLES examples per operation, seed $SEED)"
  local log=$WORK/st-$name.log rc=0
  "$ST" --config-file "$conf" run "$doc" --url "$BASE" "$@" \
    --max-examples "$EXAMPLES" --seed "$SEED" --workers "$WORKERS" --output-sanitize false \
    --report har,json --report-dir "$WORK/reports/$name" --no-color >"$log" 2>&1 || rc=$?
  # The failures, warnings and summary.
  awk '/= (FAILURES|ERRORS|WARNINGS|SUMMARY) =/ { p = 1 } p' "$log"
  [ "$rc" = 0 ] || status=1
  compgen -G "$WORK/reports/$name/json-*.json" >/dev/null \
    || { echo "(no report: schemathesis did not run; see $log)"; status=1; }
}
USER_HEADERS=(-H "Authorization: Bearer $BACKEND" -H "X-API-Key: $BACKEND" -H "X-User-ID: alice")
run main "$CONF" "$DOC" --include-path-regex '^/(frontend/v1/|backend/v1/sign$)' \
  --exclude-method DELETE "${USER_HEADERS[@]}"
run served "$CONF_SERVED" "$SERVED_DOC" --include-path-regex '^/frontend/v1/' \
  --exclude-method DELETE "${USER_HEADERS[@]}"
run admin "$CONF" "$DOC" --include-path-regex '^/admin/(health|stats)$' -H "X-API-Key: $ADMIN"
# Last, so that the seeded threads and messages serve the other runs; messages first, as a
# thread's delete takes its messages with it.
run delete-messages "$CONF" "$DOC" \
  --include-name 'DELETE /frontend/v1/threads/{threadKey}/messages/{id}' "${USER_HEADERS[@]}"
run delete-threads "$CONF" "$DOC" --include-name 'DELETE /frontend/v1/threads/{threadKey}' \
  "${USER_HEADERS[@]}"

# --- after the runs -------------------------------------------------------------------------
COUNTS_AFTER=$(served_counts)
say "mallory's thread and messages are unchanged (alice's fuzzing must not reach them)"
MALLORY_AFTER=$(snapshot_mallory) || MALLORY_AFTER="(gone: $?)"
if [ "$MALLORY_BEFORE" = "$MALLORY_AFTER" ]; then
  echo "unchanged"
else
  echo "CHANGED: before $MALLORY_BEFORE"
  echo "         after  $MALLORY_AFTER"
  status=1
fi
say "server and KMS logs: no panic"
if grep -n 'panicked' "$WORK/server.log" "$WORK/kms.log"; then status=1; else echo "none"; fi
curl -fs "$BASE/readyz" >/dev/null || { echo "the server is no longer ready"; status=1; }

# --- error shape, and the summary -------------------------------------------------------------
# progressdb-compat.md, "Errors": every error on these paths is {"error": "<message>", "code":
# "<code>"} (the SDKs show `error` as the exception's text). The document has no error
# schema, so schemathesis cannot check this; it is checked here on every answer recorded.
"$PY" - "$WORK/reports" "$(($(date +%s) - T0))" "$status" "$COUNTS_BEFORE" "$COUNTS_AFTER" \
  <<'PY' || status=1
import glob, json, re, sys
from collections import Counter
from urllib.parse import urlparse
reports, secs, status = sys.argv[1], sys.argv[2], int(sys.argv[3])
(before, before_5xx), (after, after_5xx) = (map(int, a.split()) for a in sys.argv[4:6])
# Every request schemathesis sent, its checks' probes included (the second scrape is counted
# when it is answered, after the reading: only the first one is subtracted).
served, served_5xx = after - before - 1, after_5xx - before_5xx
recorded = cases = unique = errors = 0
server_errors, bad_shape = Counter(), Counter()
def template(path):
    path = re.sub(r"^/frontend/v1/threads/[^/]+", "/frontend/v1/threads/{threadKey}", path)
    return re.sub(r"/messages/[^/]+$", "/messages/{id}", path)
for f in glob.glob(f"{reports}/*/har-*.json"):
    for e in json.load(open(f))["log"]["entries"]:
        recorded += 1
        code, text = e["response"]["status"], e["response"]["content"].get("text", "")
        what = (e["request"]["method"], template(urlparse(e["request"]["url"]).path), code)
        if code >= 500:
            server_errors[what + (text[:200],)] += 1
        if code >= 400:
            try:
                b = json.loads(text)
                ok = (isinstance(b, dict) and isinstance(b.get("error"), str)
                      and isinstance(b.get("code"), str))
            except ValueError:
                ok = False
            if not ok:
                bad_shape[what + (text[:200],)] += 1
for f in glob.glob(f"{reports}/*/json-*.json"):
    r = json.load(open(f))
    cases += r["test_cases"]["generated"]
    unique += r["test_cases"]["unique_failures"]
    errors += len(r["errors"])
for title, found in (("5xx answers", server_errors),
                     ("error answers not in the {error, code} shape", bad_shape)):
    if found:
        print(f"==> {title}: {sum(found.values())}")
        by_answer = {}
        for (method, path, code, text), n in found.items():
            by_answer.setdefault((code, text), []).append((n, f"{method} {path}"))
        for (code, text), ops in sorted(by_answer.items()):
            print(f"  {sum(n for n, _ in ops)} x {code} {text}")
            print("    on " + ", ".join(op for _, op in sorted(ops, key=lambda o: o[1])))
        status = 1
if served_5xx:
    print(f"==> the server counted {served_5xx} 5xx answers (probes included)")
    status = 1
print(f"fuzz-progressdb: {served} requests ({recorded} recorded test cases), {unique} unique "
      f"schemathesis failures, {max(served_5xx, sum(server_errors.values()))} 5xx answers, "
      f"{sum(bad_shape.values())} error answers in the wrong shape, {errors} schemathesis errors, "
      f"{secs}s: " + ("PASS" if status == 0 else "FAIL"))
sys.exit(status)
PY
exit $status
