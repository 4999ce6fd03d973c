#!/usr/bin/env bash
# Installs the system packages the project needs when they are missing: SoftHSM2 (the PKCS#11
# token used in dev and CI), OpenSC (pkcs11-tool, for inspecting tokens), curl (demo) and
# strace (the durability test).
# Sourced or run by scripts/test.sh and scripts/dev.sh.
set -euo pipefail
missing=()
{ [ -f /usr/lib/softhsm/libsofthsm2.so ] && command -v softhsm2-util >/dev/null; } || missing+=(softhsm2)
command -v pkcs11-tool >/dev/null || missing+=(opensc)
command -v curl >/dev/null || missing+=(curl)
# The durability test traces both services' syncs (tests/tests/e2e_durability.rs).
command -v strace >/dev/null || missing+=(strace)
if ((${#missing[@]})); then
  echo "==> installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
softhsm2-util --version >/dev/null
