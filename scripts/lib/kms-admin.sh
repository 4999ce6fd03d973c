# Shared by the admin scripts: finds the progressdb-kms binary and the KMS config.
#   KMS_CONFIG   the KMS's config file (default: /etc/progressdb-kms/kms.toml, or the dev one
#                under .dev/ when it exists)
#   KMS_BIN      the progressdb-kms binary (default: on PATH, else target/{release,debug})
# Every admin command is a client of the running KMS's admin socket, found from the config.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
if [ -z "${KMS_CONFIG:-}" ]; then
    if [ -f "$ROOT/.dev/softhsm/kms.toml" ]; then KMS_CONFIG=$ROOT/.dev/softhsm/kms.toml
    else KMS_CONFIG=/etc/progressdb-kms/kms.toml; fi
fi
if [ -z "${KMS_BIN:-}" ]; then
    if command -v progressdb-kms >/dev/null 2>&1; then KMS_BIN=$(command -v progressdb-kms)
    elif [ -x "$ROOT/target/release/progressdb-kms" ]; then KMS_BIN=$ROOT/target/release/progressdb-kms
    elif [ -x "$ROOT/target/debug/progressdb-kms" ]; then KMS_BIN=$ROOT/target/debug/progressdb-kms
    else echo "progressdb-kms not found: set KMS_BIN or build it (cargo build -p progressdb-kms)" >&2; exit 2; fi
fi
[ -f "$KMS_CONFIG" ] || { echo "KMS config $KMS_CONFIG not found: set KMS_CONFIG" >&2; exit 2; }
kms() { "$KMS_BIN" "$@" --config "$KMS_CONFIG"; }
