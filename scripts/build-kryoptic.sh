#!/usr/bin/env bash
# Builds the Kryoptic PKCS#11 soft token (tests/kryoptic/Cargo.toml pins the version and the
# features) and puts the module at target/kryoptic/libkryoptic_pkcs11.so, where the tests find
# it when PROGRESSDB_TEST_TOKEN=kryoptic. Installs what the build needs (OpenSSL and SQLite
# headers, libclang for bindgen) when missing. A second run only rebuilds what changed.
#
# One fix is applied to the crate before it is built. Kryoptic 1.2.0's C_GetAttributeValue
# answers CKR_ATTRIBUTE_SENSITIVE for a sensitive attribute but then fills in its length and
# copies its value into the caller's buffer anyway (src/object.rs, get_object_attributes), so
# a caller that reads the template after that answer -- as the PKCS#11 spec allows, since the
# length of a sensitive attribute must be CK_UNAVAILABLE_INFORMATION -- gets the bytes of a
# sensitive, non-extractable key such as the KEK. progressdb-kms refuses such a token at
# start (its capability probe, docs/kms.md); the fix keeps the length unavailable and the
# buffer untouched, as the spec says.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
dpkg -s libssl-dev >/dev/null 2>&1 || missing+=(libssl-dev)
dpkg -s libsqlite3-dev >/dev/null 2>&1 || missing+=(libsqlite3-dev)
dpkg -s libclang-dev >/dev/null 2>&1 || missing+=(libclang-dev)
command -v pkg-config >/dev/null || missing+=(pkg-config)
if ((${#missing[@]})); then
  echo "==> installing ${missing[*]} (to build Kryoptic)"
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
build="$TARGET_DIR/kryoptic-build"
out="$TARGET_DIR/kryoptic"
mkdir -p "$build" "$out"
cp tests/kryoptic/Cargo.toml tests/kryoptic/Cargo.lock tests/kryoptic/lib.rs "$build/"
version=1.2.0
if [ ! -f "$build/kryoptic-$version/.patched" ]; then
  # Download the crate through cargo (its registry settings), then unpack it here.
  fetch="$build/fetch"
  mkdir -p "$fetch"
  printf '[package]\nname = "kryoptic-fetch"\nversion = "0.0.0"\nedition = "2021"\n[lib]\npath = "lib.rs"\n[dependencies]\nkryoptic = { version = "=%s", default-features = false }\n[workspace]\n' "$version" > "$fetch/Cargo.toml"
  : > "$fetch/lib.rs"
  cargo fetch --manifest-path "$fetch/Cargo.toml" >/dev/null
  crate=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/kryoptic-$version.crate | head -n 1)
  rm -rf "$build/kryoptic-$version"
  tar -xzf "$crate" -C "$build"
  perl -0pi -e 's/(\n(\s*)Some\(attr\) => \{\n\s*let attr_val = attr\.get_value\(\);)/\n$2\/\/ progressdb: a sensitive (or invalid) attribute stays unavailable.\n$2Some(_) if ck_attr.ulValueLen == CK_UNAVAILABLE_INFORMATION => continue,$1/' \
    "$build/kryoptic-$version/src/object.rs"
  grep -q 'progressdb: a sensitive' "$build/kryoptic-$version/src/object.rs" \
    || { echo "build-kryoptic: the fix did not apply to kryoptic $version" >&2; exit 1; }
  touch "$build/kryoptic-$version/.patched"
fi
cargo build --release --locked --manifest-path "$build/Cargo.toml" --target-dir "$build/target"
so=$(ls -t "$build"/target/release/deps/libkryoptic_pkcs11.so | head -n 1)
cp "$so" "$out/libkryoptic_pkcs11.so.tmp"
mv "$out/libkryoptic_pkcs11.so.tmp" "$out/libkryoptic_pkcs11.so"
echo "==> Kryoptic module: $out/libkryoptic_pkcs11.so"

# The release as published, without the fix: kms-hsm/tests/token_defects.rs proves the KMS
# refuses a token that hands out sensitive values.
unpatched="$build/unpatched"
mkdir -p "$unpatched"
sed -e '/^\[patch.crates-io\]/,/^kryoptic = /d' -e 's/^name = "kryoptic-build"/name = "kryoptic-build-unpatched"/' \
  tests/kryoptic/Cargo.toml > "$unpatched/Cargo.toml"
cp tests/kryoptic/lib.rs "$unpatched/"
cp tests/kryoptic/Cargo.unpatched.lock "$unpatched/Cargo.lock"
cargo build --release --locked --manifest-path "$unpatched/Cargo.toml" --target-dir "$build/target"
so=$(ls -t "$build"/target/release/deps/libkryoptic_pkcs11-*.so | head -n 1)
cp "$so" "$out/libkryoptic_pkcs11-unpatched.so.tmp"
mv "$out/libkryoptic_pkcs11-unpatched.so.tmp" "$out/libkryoptic_pkcs11-unpatched.so"
echo "==> Kryoptic module as released (for the defect test): $out/libkryoptic_pkcs11-unpatched.so"
