#!/usr/bin/env bash
# Builds the shipped vfio-gpu-dra binary for one architecture with the `dist` cargo
# profile (Cargo.toml: release + fat LTO, one codegen unit) and prints its path.
#
# Usage: deploy/image/build-bin.sh amd64|arm64
#        deploy/image/build-bin.sh --check arm64   (exit 0 when the cross toolchain is here)
#
# amd64 is the build machine's own target. arm64 is cross-built with Debian's cross
# toolchain, set up by environment for this one cargo run only (never in
# .cargo/config, which would change every other build):
#   apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross
#   rustup target add aarch64-unknown-linux-gnu
# ring (rustls' crypto) compiles C and assembly, hence CC_/AR_ for the target.
# The binary lands in <target>/[<triple>/]dist/vfio-gpu-dra, <target> being
# $CARGO_TARGET_DIR or target/.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
case "$TARGET" in /*) ;; *) TARGET=$ROOT/$TARGET ;; esac

CHECK_ONLY=0
if [ "${1:-}" = --check ]; then CHECK_ONLY=1; shift; fi
ARCH=${1:-}

# What an arm64 cross build needs, one line per missing piece (empty: all here).
arm64_missing() {
    command -v aarch64-linux-gnu-gcc > /dev/null ||
        echo "aarch64-linux-gnu-gcc (apt-get install gcc-aarch64-linux-gnu)"
    [ -e /usr/aarch64-linux-gnu/lib/crt1.o ] ||
        echo "the arm64 C library (apt-get install libc6-dev-arm64-cross)"
    for tool in aarch64-linux-gnu-strip aarch64-linux-gnu-objcopy; do
        command -v "$tool" > /dev/null || echo "$tool (apt-get install binutils-aarch64-linux-gnu)"
    done
    [ -d "$(rustc --print sysroot)/lib/rustlib/aarch64-unknown-linux-gnu/lib" ] ||
        echo "Rust's std for arm64 (rustup target add aarch64-unknown-linux-gnu)"
}

case "$ARCH" in
amd64)
    [ $CHECK_ONLY = 1 ] && exit 0
    (cd "$ROOT" && cargo build -q --profile dist -p vfio-gpu-dra) >&2
    BIN=$TARGET/dist/vfio-gpu-dra
    ;;
arm64)
    missing=$(arm64_missing)
    if [ -n "$missing" ]; then
        [ $CHECK_ONLY = 1 ] || echo "build-bin.sh: no arm64 cross toolchain; missing:"$'\n'"$missing" >&2
        exit 1
    fi
    [ $CHECK_ONLY = 1 ] && exit 0
    (cd "$ROOT" &&
        CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
        CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc \
        AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar \
        cargo build -q --profile dist -p vfio-gpu-dra --target aarch64-unknown-linux-gnu) >&2
    BIN=$TARGET/aarch64-unknown-linux-gnu/dist/vfio-gpu-dra
    ;;
*)
    echo "usage: build-bin.sh [--check] amd64|arm64" >&2
    exit 2
    ;;
esac
[ -x "$BIN" ] || { echo "build-bin.sh: cargo finished but $BIN is missing" >&2; exit 1; }
echo "$BIN"
