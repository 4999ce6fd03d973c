#!/usr/bin/env bash
# Makes (once) a Python virtual environment with ProgressDB's published Python SDK, for the
# SDK end-to-end test (tests/tests/e2e_progressdb_sdk.rs) and the ProgressDB-path fuzzer:
#   scripts/sdk-venv.sh [DIR]     # DIR defaults to target/sdk-venv; prints DIR/bin/python
# The SDK comes from the package registry at the pinned version (progressdb==0.2.0, which
# needs Python 3.11+ at run time); schemathesis is added when FUZZ=1. Safe to run
# concurrently: the first caller builds it under a lock, the others wait.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-target/sdk-venv}
SDK_VERSION=0.2.0
mkdir -p "$(dirname "$DIR")"
exec 9>"$DIR.lock"
flock 9
want="progressdb==$SDK_VERSION${FUZZ:+ schemathesis}"
if [ ! -x "$DIR/bin/python" ] || [ "$(cat "$DIR/.installed" 2>/dev/null)" != "$want" ]; then
  rm -rf "$DIR"
  python3 -m venv "$DIR" >&2
  # shellcheck disable=SC2086
  "$DIR/bin/pip" install -q --no-compile "progressdb==$SDK_VERSION" ${FUZZ:+schemathesis} >&2
  echo "$want" >"$DIR/.installed"
fi
echo "$DIR/bin/python"
