#!/usr/bin/env bash
# Builds the OCI image (deploy/image/build.sh), unpacks it with umoci and runs the
# shipped binary from the unpacked root filesystem in a chroot, as the image's
# config says (entrypoint, PATH). Checks that the DaemonSet references the built
# name, that the manifests the build renders pin the image by digest, that the binary is stripped with its debug info beside the image, that the
# image's chroot (the engine's way to the host's modprobe) runs, and that a second
# build gives the same digest. Prints the image's sizes.
#
# Usage: deploy/image/test.sh [--bin PATH]   (as build.sh; needs root for chroot)
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
BUILD_ARGS=("$@")

[ "$(id -u)" = 0 ] || { echo "test.sh: needs root (chroot, root-owned layers)" >&2; exit 1; }
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
PASSED=0
FAILED=0
pass() { echo "image: PASS $*"; PASSED=$((PASSED + 1)); }
fail() { echo "image: FAIL $*"; FAILED=$((FAILED + 1)); }

t0=$(date +%s.%N)
NAME=$("$HERE/build.sh" "${BUILD_ARGS[@]}")
build_s=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
# shellcheck disable=SC1091
. "$ROOT/target/image/image.env"
OUT_DIR=$ROOT/target/image
[ "$NAME" = "$("$HERE/build.sh" --print-name)" ] && pass "build names the image $NAME" ||
    fail "build printed $NAME, --print-name says $("$HERE/build.sh" --print-name)"

# The DaemonSet runs exactly the image the build names.
mapfile -t refs < <(sed -n 's/^[[:space:]]*image:[[:space:]]*//p' "$ROOT/deploy/daemonset.yaml")
if [ ${#refs[@]} -gt 0 ] && [ -z "$(printf '%s\n' "${refs[@]}" | grep -vxF "$NAME")" ]; then
    pass "deploy/daemonset.yaml references $NAME"
else
    fail "deploy/daemonset.yaml references '${refs[*]}', the build names $NAME"
fi
# The manifests the build produces run this build by digest (security review M4):
# deploy/*.yaml with only the image line changed to repository@digest.
PINNED=$OUT_DIR/deploy/daemonset.yaml
REF=${NAME%:*}@$DIGEST
if [ -f "$PINNED" ] && [ "$(sed -n 's/^[[:space:]]*image:[[:space:]]*//p' "$PINNED")" = "$REF" ] &&
    diff <(tail -n +2 "$PINNED" | sed "s|$REF|$NAME|") "$ROOT/deploy/daemonset.yaml" > /dev/null; then
    pass "$PINNED runs $REF, otherwise deploy/daemonset.yaml"
else
    fail "$PINNED does not pin $REF: $(sed -n 's/^[[:space:]]*image:[[:space:]]*//p' "$PINNED" 2>&1)"
fi
for f in rbac admission-policy deviceclass networkpolicy; do
    cmp -s <(tail -n +2 "$OUT_DIR/deploy/$f.yaml") "$ROOT/deploy/$f.yaml" ||
        fail "$OUT_DIR/deploy/$f.yaml differs from deploy/$f.yaml"
done
ann=$(python3 -c 'import json,sys; m=json.load(open(sys.argv[1]))["manifests"][0]["annotations"]; print(m["io.containerd.image.name"], m["org.opencontainers.image.ref.name"])' "$LAYOUT/index.json")
[ "$ann" = "$NAME $TAG" ] && pass "index.json names $NAME (containerd) and tag $TAG" ||
    fail "index.json annotations: $ann"

# Unpack as a runtime would and run the entrypoint with the image's environment.
umoci unpack --image "$LAYOUT:$TAG" "$WORK/bundle" > /dev/null
RFS=$WORK/bundle/rootfs
mapfile -t ENVS < <(python3 -c 'import json,sys; [print(e) for e in json.load(open(sys.argv[1]))["process"]["env"]]' "$WORK/bundle/config.json")
mapfile -t ARGS < <(python3 -c 'import json,sys; [print(a) for a in json.load(open(sys.argv[1]))["process"]["args"]]' "$WORK/bundle/config.json")
ENTRY=${ARGS[0]}
run() { env -i "${ENVS[@]}" chroot "$RFS" "$@"; }

# Before anything runs in it: nothing but the binary, chroot, the libraries they load, licences and /tmp.
extra=$(cd "$RFS" && find . ! -type d ! -path './usr/bin/vfio-gpu-dra' ! -path './usr/sbin/chroot' \
    ! -path './usr/lib/x86_64-linux-gnu/*.so*' ! -path './usr/lib64/ld-linux-x86-64.so.2' \
    ! -path './usr/share/doc/*' ! -path './bin' ! -path './sbin' ! -path './lib' ! -path './lib64')
[ -z "$extra" ] && pass "root filesystem holds only the binary, chroot, their libraries and licences: $(cd "$RFS" && find . ! -type d | sort | tr '\n' ' ')" ||
    fail "unexpected files in the image: $extra"

out=$(run "$ENTRY" --version 2>&1) && [ "$out" = "vfio-gpu-dra $TAG" ] &&
    pass "chroot: $ENTRY --version: $out" || fail "chroot: $ENTRY --version: $out"

if out=$(run "$ENTRY" devices --demo 2>&1); then
    n=$(grep -cE '^[[:xdigit:]]{4}:[[:xdigit:]]{2}:[[:xdigit:]]{2}\.[0-7] ' <<< "$out" || true)
    [ "$n" = 8 ] && pass "chroot: devices --demo lists 8 GPUs" ||
        fail "chroot: devices --demo listed $n GPU lines:"$'\n'"$out"
else
    fail "chroot: devices --demo failed:"$'\n'"$out"
fi

# The engine reaches the host's modprobe/nvidia-smi as `chroot <host-root> PROG`, with
# chroot found on the image's PATH.
out=$(run chroot / "$ENTRY" --version 2>&1) && [ "$out" = "vfio-gpu-dra $TAG" ] &&
    pass "chroot: the image's chroot runs (env: ${ENVS[*]})" || fail "chroot in the image: $out"

# Stripped, and the debug info kept beside the image matches it.
shipped=$RFS/usr/bin/vfio-gpu-dra
bid() { readelf -n "$1" 2> /dev/null | awk '/Build ID/ { print $3 }'; }
if readelf -S "$shipped" | grep -qE '\.debug_(info|line|str|abbrev|ranges|loc)'; then
    fail "the shipped binary still has debug info"
elif ! readelf -S "$shipped" | grep -q '\.symtab'; then
    fail "the shipped binary has no symbol table (backtraces would name no function)"
elif ! readelf -S "$DEBUG" | grep -q '\.debug_line'; then
    fail "$DEBUG has no .debug_line"
elif [ -z "$(bid "$shipped")" ] || [ "$(bid "$shipped")" != "$(bid "$DEBUG")" ]; then
    fail "build IDs differ: shipped $(bid "$shipped"), debug file $(bid "$DEBUG")"
else
    pass "binary stripped of debug info, symbols kept ($(stat -c %s "$shipped") bytes); debug info beside the image ($(stat -c %s "$DEBUG") bytes), build ID $(bid "$shipped")"
fi

# Same inputs, same digest.
SOURCE_DATE_EPOCH=$(git -C "$ROOT" log -1 --format=%ct 2>/dev/null || echo 0)
export SOURCE_DATE_EPOCH
"$HERE/build.sh" "${BUILD_ARGS[@]}" --out "$WORK/again" > /dev/null
again=$(sed -n 's/^DIGEST=//p' "$WORK/again/image.env")
[ "$again" = "$DIGEST" ] && pass "rebuild gives the same digest $DIGEST" ||
    fail "rebuild gave $again, first build $DIGEST"

echo "image: $NAME $DIGEST"
awk -v c="$COMPRESSED_BYTES" -v u="$UNCOMPRESSED_BYTES" -v a="$(stat -c %s "$ARCHIVE")" -v s="$build_s" 'BEGIN {
    printf "image: size %.1f MiB compressed (layer + config + manifest), %.1f MiB uncompressed, oci-archive %.1f MiB; build %s s\n",
        c / 1048576, u / 1048576, a / 1048576, s }'
echo "image: $PASSED passed, $FAILED failed"
[ "$FAILED" = 0 ]
