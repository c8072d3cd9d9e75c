#!/usr/bin/env bash
# Cross-builds the arm64 release binary of vfio-gpu-dra with Debian's cross toolchain
# (gcc-aarch64-linux-gnu links it and compiles ring's C and assembly), installing the
# toolchain with apt-get and the Rust target with rustup when missing. Prints the
# binary's path.
#
# Usage: deploy/image/cross-build.sh   (<target>/aarch64-unknown-linux-gnu/release/vfio-gpu-dra;
#        <target> is $CARGO_TARGET_DIR, else target/)
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
case "$TARGET" in /*) ;; *) TARGET=$ROOT/$TARGET ;; esac
RUST_TARGET=aarch64-unknown-linux-gnu

if ! command -v aarch64-linux-gnu-gcc > /dev/null; then
    echo "cross-build: installing Debian's arm64 cross toolchain" >&2
    export DEBIAN_FRONTEND=noninteractive
    pkgs=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross binutils-aarch64-linux-gnu)
    apt-get install -y -qq --no-install-recommends "${pkgs[@]}" > /dev/null 2>&1 ||
        { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${pkgs[@]}" > /dev/null; }
fi
if ! rustup target list --installed 2> /dev/null | grep -qx "$RUST_TARGET"; then
    rustup target add "$RUST_TARGET" >&2
fi
# The same two variables every time: cc's build scripts rerun when CC_<target> changes.
(cd "$ROOT" && CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
    CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc \
    cargo build -q --release -p vfio-gpu-dra --target "$RUST_TARGET" >&2)
echo "$TARGET/$RUST_TARGET/release/vfio-gpu-dra"
