#!/usr/bin/env bash
# Provision a SoftHSM token and the progressdb KEK for local development and tests.
#
#   softhsm-setup/setup.sh [DIR]        (default DIR: <repo>/.dev/softhsm, git-ignored)
#
# Idempotent: a second run changes nothing and creates no duplicate token or KEK.
# See softhsm-setup/README.md for the files it writes and the environment it reads.
set -euo pipefail
umask 077

die() { echo "setup.sh: error: $*" >&2; exit 1; }
say() { echo "setup.sh: $*"; }

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
repo_root=$(cd "$script_dir/.." && pwd -P)

dir=${1:-$repo_root/.dev/softhsm}
token_label=${PROGRESSDB_HSM_TOKEN_LABEL:-progressdb}
kek_label=${PROGRESSDB_HSM_KEK_LABEL:-progressdb-kek}

[ "$#" -le 1 ] || die "usage: $0 [DIR]"
[ -n "$token_label" ] && [ "${#token_label}" -le 32 ] \
    || die "PROGRESSDB_HSM_TOKEN_LABEL must be 1 to 32 characters"
[[ "$kek_label" =~ ^[A-Za-z0-9_-]{1,64}$ ]] \
    || die "PROGRESSDB_HSM_KEK_LABEL must be 1 to 64 characters of [A-Za-z0-9_-]"

# --- the PKCS#11 module and softhsm2-util -------------------------------------------------
module=${PROGRESSDB_HSM_MODULE:-}
if [ -z "$module" ]; then
    for m in /usr/lib/softhsm/libsofthsm2.so \
             /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so \
             /usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so \
             /usr/local/lib/softhsm/libsofthsm2.so \
             /usr/lib64/pkcs11/libsofthsm2.so \
             /opt/homebrew/lib/softhsm/libsofthsm2.so; do
        if [ -e "$m" ]; then module=$m; break; fi
    done
fi
[ -n "$module" ] && [ -e "$module" ] \
    || die "SoftHSM module not found; install softhsm2 (apt-get install softhsm2) or set PROGRESSDB_HSM_MODULE"
command -v softhsm2-util >/dev/null \
    || die "softhsm2-util not found; install softhsm2 (apt-get install softhsm2)"

# --- directory and SoftHSM config -----------------------------------------------------------
mkdir -p "$dir"
dir=$(cd "$dir" && pwd -P)
mkdir -p "$dir/tokens"
conf=$dir/softhsm2.conf

# Writes $2 to file $1 only when the content differs; says what it did.
write_if_changed() {
    local file=$1 content=$2 what=$3
    if [ -f "$file" ] && [ "$(cat "$file")" = "$content" ]; then
        say "$what unchanged: $file"
    else
        local verb=created
        [ -f "$file" ] && verb=updated
        printf '%s\n' "$content" >"$file.tmp.$$"
        mv -f "$file.tmp.$$" "$file"
        say "$what $verb: $file"
    fi
}

write_if_changed "$conf" "# Written by softhsm-setup/setup.sh: a token directory of our own.
directories.tokendir = $dir/tokens
objectstore.backend = file
log.level = ERROR
slots.removable = false" "SoftHSM config"
export SOFTHSM2_CONF=$conf

# --- token (by label) -----------------------------------------------------------------------
token_count() {
    softhsm2-util --show-slots 2>/dev/null \
        | sed -n 's/^[[:space:]]*Label:[[:space:]]*//p' \
        | sed 's/[[:space:]]*$//' \
        | grep -Fxc -- "$token_label" || true
}

# A PIN: 32 hex digits from the kernel RNG.
new_pin() { od -An -tx1 -N16 /dev/urandom | tr -d ' \n'; }

# Creates a mode-0600 secret file unless it exists; tightens the mode of an existing one.
ensure_secret_file() {
    local file=$1 what=$2
    if [ -f "$file" ]; then
        local mode
        mode=$(stat -c %a "$file" 2>/dev/null || stat -f %Lp "$file")
        if [ "${mode: -2}" != "00" ]; then
            chmod 600 "$file"
            say "$what was group/world accessible; mode set to 0600: $file"
        else
            say "$what kept: $file"
        fi
    else
        (umask 077 && new_pin >"$file.tmp.$$" && mv -f "$file.tmp.$$" "$file")
        say "$what created (mode 0600): $file"
    fi
}

case "$(token_count)" in
    0)
        ensure_secret_file "$dir/user-pin" "user PIN file"
        ensure_secret_file "$dir/so-pin" "SO PIN file"
        say "initialising token '$token_label'"
        softhsm2-util --init-token --free --label "$token_label" \
            --pin "$(cat "$dir/user-pin")" --so-pin "$(cat "$dir/so-pin")" >/dev/null \
            || die "softhsm2-util could not initialise token '$token_label'"
        [ "$(token_count)" = 1 ] || die "token '$token_label' not visible after initialisation"
        say "token '$token_label' initialised"
        ;;
    1)
        [ -f "$dir/user-pin" ] \
            || die "token '$token_label' exists but $dir/user-pin is missing; restore it, or delete $dir/tokens to start over"
        ensure_secret_file "$dir/user-pin" "user PIN file"
        [ -f "$dir/so-pin" ] && ensure_secret_file "$dir/so-pin" "SO PIN file"
        say "token '$token_label' already present"
        ;;
    *)
        die "several tokens are labelled '$token_label' in $dir/tokens; remove the extra ones"
        ;;
esac

# --- minimal KMS config for init-kek (and local runs) ---------------------------------------
kms_conf=$dir/kms.toml
write_if_changed "$kms_conf" "# Written by softhsm-setup/setup.sh for local development; regenerated when it differs.
# Reference of every key: kms-hsm/progressdb-kms.example.toml.
[listen]
unix = \"$dir/kms.sock\"
# Local development: one user runs the KMS, the server and the admin commands (an alert;
# production configs give the server a uid of its own, docs/deploy.md).
single_user = true

[hsm]
module = \"$module\"
token_label = \"$token_label\"
pin_file = \"$dir/user-pin\"
kek_label = \"$kek_label\"

[store]
path = \"$dir/kms-store\"" "KMS config"

# --- the KEK, created by the KMS itself -----------------------------------------------------
find_kms_bin() {
    if [ -n "${PROGRESSDB_KMS_BIN:-}" ]; then
        [ -x "$PROGRESSDB_KMS_BIN" ] || die "PROGRESSDB_KMS_BIN=$PROGRESSDB_KMS_BIN is not an executable"
        echo "$PROGRESSDB_KMS_BIN"
        return
    fi
    local c
    for c in "$(command -v progressdb-kms 2>/dev/null || true)" \
             ${CARGO_TARGET_DIR:+"$CARGO_TARGET_DIR/release/progressdb-kms"} \
             ${CARGO_TARGET_DIR:+"$CARGO_TARGET_DIR/debug/progressdb-kms"} \
             "$repo_root/target/release/progressdb-kms" \
             "$repo_root/target/debug/progressdb-kms"; do
        if [ -n "$c" ] && [ -x "$c" ]; then echo "$c"; return; fi
    done
}

kms_bin=$(find_kms_bin)
if [ -z "$kms_bin" ]; then
    say "KEK NOT created: no progressdb-kms binary found (set PROGRESSDB_KMS_BIN or run"
    say "  'cargo build -p progressdb-kms'), then re-run this script, or run:"
    say "  SOFTHSM2_CONF=$conf progressdb-kms init-kek --config $kms_conf"
elif ! "$kms_bin" --help 2>&1 | grep -q 'init-kek'; then
    [ -z "${PROGRESSDB_KMS_BIN:-}" ] \
        || die "$kms_bin has no init-kek subcommand"
    say "KEK NOT created: $kms_bin has no init-kek subcommand yet (stale build?);"
    say "  rebuild it and re-run this script"
else
    say "creating the KEK if missing: $kms_bin init-kek"
    # The generated config is the whole truth: no environment overrides, PIN from its file.
    (
        unset PROGRESSDB_KMS_HSM_PIN
        while IFS= read -r v; do unset "$v"; done < <(compgen -e | grep '^PROGRESSDB_KMS__' || true)
        "$kms_bin" init-kek --config "$kms_conf"
    ) || die "progressdb-kms init-kek failed"
fi

echo
echo "# SoftHSM token '$token_label' ready in $dir. Use it with:"
echo "export SOFTHSM2_CONF=$conf"
