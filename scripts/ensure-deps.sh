#!/usr/bin/env bash
# Installs the system packages the project needs when they are missing: SoftHSM2 (the PKCS#11
# token used in dev and CI), OpenSC (pkcs11-tool, for inspecting tokens), curl (demo), strace
# (the durability test), systemd-analyze (the units' check) and PostgreSQL (the KMS's shared key store; tests start private
# clusters of their own, so the package's default cluster is not created).
# Sourced or run by scripts/test.sh and scripts/dev.sh.
set -euo pipefail
missing=()
{ [ -f /usr/lib/softhsm/libsofthsm2.so ] && command -v softhsm2-util >/dev/null; } || missing+=(softhsm2)
command -v pkcs11-tool >/dev/null || missing+=(opensc)
command -v curl >/dev/null || missing+=(curl)
# The durability test traces both services' syncs (tests/tests/e2e_durability.rs).
command -v strace >/dev/null || missing+=(strace)
# The PostgreSQL key store's tests (testkit::pg): initdb/postgres/psql, run as user postgres.
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(postgresql)
command -v setpriv >/dev/null || missing+=(util-linux)
# The deployment units are checked with `systemd-analyze verify` (tests/tests/docs_reference.rs).
command -v systemd-analyze >/dev/null || missing+=(systemd)
# scripts/test.sh links with mold: the ~60 test binaries link in a fraction of the time.
command -v mold >/dev/null || missing+=(mold)
if ((${#missing[@]})); then
  echo "==> installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=sudo
  if [[ " ${missing[*]} " == *" postgresql "* ]]; then
    # Only the binaries: no machine-wide cluster is created or started.
    $SUDO mkdir -p /etc/postgresql-common
    echo 'create_main_cluster = false' | $SUDO tee /etc/postgresql-common/createcluster.conf >/dev/null
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
softhsm2-util --version >/dev/null
# scripts/test.sh runs the tests with cargo-nextest (on the machine image; built here otherwise).
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "==> installing cargo-nextest"
  cargo install --locked cargo-nextest >/dev/null
fi
