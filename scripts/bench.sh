#!/usr/bin/env bash
# Benchmarks every path of the system against the limit it approaches, measured in the same
# run (a bare hyper server, raw PKCS#11 loops, the key store alone, the server with encryption
# off), and writes docs/benchmarks.md and docs/benchmarks.json.
#
#   scripts/bench.sh [--quick] [--only ID,ID] [--dir DIR] [--out PREFIX]
#
# Builds release binaries of progressdb-kms, progressdb and progressdb-bench, installs SoftHSM
# when missing, starts everything it measures on its own tokens, stores and sockets (under DIR,
# default the system temp dir: put it on the disk you care about, the stores fsync), and
# removes them after. A full run takes about 10 minutes on 2 cores; close other work first,
# because the figures are only as quiet as the machine.
#
# --quick is a smoke run (tiny sizes, seconds): it writes target/bench-quick.{md,json}
# unless --out says otherwise, so it never overwrites the real figures.
# --only takes scenario id prefixes, e.g. --only kms_encrypt,server_post.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-deps.sh
out=docs/benchmarks
for a in "$@"; do
    case $a in
        --quick) out=target/bench-quick ;;
    esac
done
has_out=no
for a in "$@"; do [ "$a" = --out ] && has_out=yes; done
cargo build --release --locked -p progressdb-kms -p progressdb -p progressdb-bench --bins
export E2E_BIN_DIR="$PWD/target/release"
export BENCH_COMMIT="$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo '+changes')"
if [ $has_out = yes ]; then
    exec target/release/progressdb-bench "$@"
else
    exec target/release/progressdb-bench --out "$out" "$@"
fi
