#!/usr/bin/env bash
# Builds the multi-arch OCI image (deploy/image/build.sh) and checks it as a node would
# see it: the image index names one manifest per architecture with the right platform;
# each architecture's image, unpacked with umoci, stays under the size limit
# (IMAGE_MAX_UNPACKED_BYTES, default 20000000 = 20 MB) and holds only the binary,
# chroot, their libraries and licences; its binary is stripped, with its debug info
# beside the image under the same build ID. Then it runs the shipped binary from the
# unpacked root filesystem with the image's environment: amd64 in a chroot (natively),
# arm64 under qemu-user (qemu-aarch64 -L <rootfs>: the image's own loader and glibc),
# where it runs `--help`, `devices --demo` and the whole `demo`. Also checks that the
# DaemonSet references the built name and that a second build gives the same digest.
# Prints the sizes per architecture.
#
# Usage: deploy/image/test.sh [build.sh arguments]   (needs root for chroot)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
case "$TARGET" in /*) ;; *) TARGET=$ROOT/$TARGET ;; esac
BUILD_ARGS=("$@")
MAX_UNPACKED=${IMAGE_MAX_UNPACKED_BYTES:-20000000}

[ "$(id -u)" = 0 ] || { echo "test.sh: needs root (chroot, root-owned layers)" >&2; exit 1; }
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
PASSED=0
FAILED=0
pass() { echo "image: PASS $*"; PASSED=$((PASSED + 1)); }
fail() { echo "image: FAIL $*"; FAILED=$((FAILED + 1)); }
if ! command -v qemu-aarch64 > /dev/null; then
    echo "image: installing qemu-user (runs the arm64 image)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends qemu-user > /dev/null 2>&1 ||
        { apt-get update -qq && apt-get install -y -qq --no-install-recommends qemu-user > /dev/null; }
fi

t0=$(date +%s.%N)
NAME=$("$HERE/build.sh" "${BUILD_ARGS[@]}")
build_s=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
OUT_DIR=$TARGET/image
for ((i = 0; i < ${#BUILD_ARGS[@]}; i++)); do
    [ "${BUILD_ARGS[$i]}" = --out ] && OUT_DIR=${BUILD_ARGS[$((i + 1))]}
done
# shellcheck disable=SC1091
. "$OUT_DIR/image.env"
[ "$NAME" = "$("$HERE/build.sh" --print-name)" ] && pass "build names the image $NAME" ||
    fail "build printed $NAME, --print-name says $("$HERE/build.sh" --print-name)"

# The DaemonSet runs exactly the image the build names.
mapfile -t refs < <(sed -n 's/^[[:space:]]*image:[[:space:]]*//p' "$ROOT/deploy/daemonset.yaml")
if [ ${#refs[@]} -gt 0 ] && [ -z "$(printf '%s\n' "${refs[@]}" | grep -vxF "$NAME")" ]; then
    pass "deploy/daemonset.yaml references $NAME"
else
    fail "deploy/daemonset.yaml references '${refs[*]}', the build names $NAME"
fi

# index.json → one image index (tagged, named for containerd) → one manifest per
# architecture, whose config says the same architecture.
index_report=$(python3 - "$LAYOUT" "$NAME" "$TAG" "$DIGEST" "$ARCHES" <<'PY'
import json, os, sys
layout, name, tag, digest, arches = sys.argv[1:6]
def blob(d):
    with open(os.path.join(layout, "blobs", *d["digest"].split(":"))) as f:
        return json.load(f)
with open(os.path.join(layout, "index.json")) as f:
    top = json.load(f)
errors = []
if len(top["manifests"]) != 1:
    errors.append(f"index.json has {len(top['manifests'])} entries, want 1 (the image index)")
entry = top["manifests"][0]
if entry["mediaType"] != "application/vnd.oci.image.index.v1+json":
    errors.append(f"index.json's entry is a {entry['mediaType']}, not an image index")
ann = entry.get("annotations", {})
if (ann.get("io.containerd.image.name"), ann.get("org.opencontainers.image.ref.name")) != (name, tag):
    errors.append(f"index.json annotations {ann}")
if entry["digest"] != digest:
    errors.append(f"index.json names {entry['digest']}, image.env {digest}")
index = blob(entry)
seen = []
for m in index["manifests"]:
    p = m.get("platform", {})
    config = blob(blob(m)["config"])
    if m["mediaType"] != "application/vnd.oci.image.manifest.v1+json":
        errors.append(f"{m['digest']} is a {m['mediaType']}")
    if p.get("os") != "linux" or config["os"] != "linux" or config["architecture"] != p.get("architecture"):
        errors.append(f"{m['digest']}: platform {p}, config {config['os']}/{config['architecture']}")
    if p.get("architecture") == "arm64" and p.get("variant") != "v8":
        errors.append(f"arm64 without variant v8: {p}")
    seen.append(p.get("architecture"))
if sorted(seen) != sorted(arches.split()):
    errors.append(f"the index holds {seen}, the build made {arches.split()}")
if errors:
    print("; ".join(errors))
    sys.exit(1)
print(" ".join(f"{m['platform']['architecture']}={m['digest'][:19]}" for m in index["manifests"]))
PY
) && pass "index.json → image index $DIGEST ($NAME): $index_report" || fail "image index: $index_report"

# One architecture's image unpacked by umoci, from a layout whose tag names its manifest.
unpack() {
    local arch=$1 var=DIGEST_$1
    local layout=$WORK/layout-$arch
    mkdir -p "$layout"
    cp -al "$LAYOUT/blobs" "$layout/blobs"
    cp "$LAYOUT/oci-layout" "$layout/"
    python3 - "$LAYOUT" "${!var}" > "$layout/index.json" <<'PY'
import json, os, sys
layout, digest = sys.argv[1:3]
with open(os.path.join(layout, "blobs", *digest.split(":"))) as f:
    size = len(f.read().encode())
print(json.dumps({"schemaVersion": 2, "manifests": [{
    "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": size,
    "annotations": {"org.opencontainers.image.ref.name": "unpack"}}]}))
PY
    umoci unpack --image "$layout:unpack" "$WORK/bundle-$arch" > /dev/null
}

bid() { readelf -n "$1" 2> /dev/null | awk '/Build ID/ { print $3 }'; }
check_arch() {
    local arch=$1 trip loader machine
    case "$arch" in
    amd64) trip=x86_64-linux-gnu; loader=./usr/lib64/ld-linux-x86-64.so.2; machine='Advanced Micro Devices X86-64' ;;
    arm64) trip=aarch64-linux-gnu; loader=./usr/lib/ld-linux-aarch64.so.1; machine=AArch64 ;;
    esac
    unpack "$arch"
    local rfs=$WORK/bundle-$arch/rootfs
    local bundle_config=$WORK/bundle-$arch/config.json
    local envs args
    mapfile -t envs < <(python3 -c 'import json,sys; [print(e) for e in json.load(open(sys.argv[1]))["process"]["env"]]' "$bundle_config")
    mapfile -t args < <(python3 -c 'import json,sys; [print(a) for a in json.load(open(sys.argv[1]))["process"]["args"]]' "$bundle_config")
    local entry=${args[0]}
    run() {
        if [ "$arch" = amd64 ]; then
            env -i "${envs[@]}" chroot "$rfs" "$@"
        else
            # The image's loader and libraries (-L), the image's binary, the image's env.
            local prog=$1; shift
            env -i "${envs[@]}" qemu-aarch64 -L "$rfs" "$rfs$prog" "$@"
        fi
    }
    local how=chroot
    [ "$arch" = arm64 ] && how=qemu-aarch64

    # Before anything runs in it: nothing but the binary, chroot, the libraries they
    # load, licences and /tmp.
    local extra
    extra=$(cd "$rfs" && find . ! -type d ! -path './usr/bin/vfio-gpu-dra' ! -path './usr/sbin/chroot' \
        ! -path "./usr/lib/$trip/*.so*" ! -path "$loader" \
        ! -path './usr/share/doc/*' ! -path './bin' ! -path './sbin' ! -path './lib' ! -path './lib64')
    [ -z "$extra" ] && pass "$arch: root filesystem holds only the binary, chroot, their libraries and licences: $(cd "$rfs" && find . ! -type d | sort | tr '\n' ' ')" ||
        fail "$arch: unexpected files in the image: $extra"

    # The size a node's disk holds for this architecture, against the limit.
    local unpacked
    unpacked=$(find "$rfs" -type f -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }')
    if [ "$unpacked" -le "$MAX_UNPACKED" ]; then
        pass "$arch: unpacked $unpacked bytes ($(awk -v u="$unpacked" 'BEGIN { printf "%.1f MB", u / 1e6 }')) <= $MAX_UNPACKED"
    else
        fail "$arch: unpacked $unpacked bytes, over the limit $MAX_UNPACKED"
    fi

    local shipped=$rfs/usr/bin/vfio-gpu-dra dvar=DEBUG_$arch
    local debug=${!dvar}
    local got
    got=$(readelf -h "$shipped" | awk -F: '/Machine:/ { gsub(/^ +/, "", $2); print $2 }')
    [ "$got" = "$machine" ] && pass "$arch: the binary is built for $got" || fail "$arch: the binary is built for '$got', want '$machine'"

    local out
    out=$(run "$entry" --version 2>&1) && [ "$out" = "vfio-gpu-dra $TAG" ] &&
        pass "$arch ($how): $entry --version: $out" || fail "$arch ($how): $entry --version: $out"
    out=$(run "$entry" --help 2>&1) && grep -q '^Usage: vfio-gpu-dra' <<< "$out" && grep -qw serve <<< "$out" &&
        pass "$arch ($how): $entry --help lists the commands" || fail "$arch ($how): $entry --help:"$'\n'"$out"

    # The demo host: in the chroot's /tmp for amd64, in this test's directory for arm64
    # (qemu-user runs it on this machine's filesystem).
    local demo_dir=/tmp/demo
    [ "$arch" = arm64 ] && demo_dir=$WORK/demo-$arch
    if out=$(run "$entry" devices --demo --demo-dir "$demo_dir" 2>&1); then
        local n
        n=$(grep -cE '^[[:xdigit:]]{4}:[[:xdigit:]]{2}:[[:xdigit:]]{2}\.[0-7] ' <<< "$out" || true)
        [ "$n" = 8 ] && pass "$arch ($how): devices --demo lists 8 GPUs" ||
            fail "$arch ($how): devices --demo listed $n GPU lines:"$'\n'"$out"
    else
        fail "$arch ($how): devices --demo failed:"$'\n'"$out"
    fi

    if [ "$arch" = amd64 ]; then
        # The engine reaches the host's modprobe/nvidia-smi as `chroot <host-root> PROG`,
        # with chroot found on the image's PATH.
        out=$(run chroot / "$entry" --version 2>&1) && [ "$out" = "vfio-gpu-dra $TAG" ] &&
            pass "$arch (chroot): the image's chroot runs (env: ${envs[*]})" || fail "$arch: chroot in the image: $out"
    else
        out=$(run /usr/sbin/chroot --version 2>&1) && grep -q '^chroot (GNU coreutils)' <<< "$out" &&
            pass "$arch ($how): the image's chroot runs: $(head -1 <<< "$out")" || fail "$arch: chroot in the image: $out"
        # The whole demo: the real plugin serving the kubelet emulator over its sockets,
        # the fake API server, a claim prepared and unprepared (README "Try it").
        local t1=$SECONDS
        if out=$(run "$entry" demo 2>&1) && grep -q 'vfio-pci' <<< "$out"; then
            pass "$arch ($how): demo ran ($((SECONDS - t1)) s, $(wc -l <<< "$out") lines)"
        else
            fail "$arch ($how): demo failed:"$'\n'"$(tail -30 <<< "$out")"
        fi
    fi

    # Stripped: no DWARF and no symbol table in the image; both in the .debug file
    # beside it, under the same build ID.
    if readelf -S "$shipped" | grep -qE '\.debug_(info|line|str|abbrev|ranges|loc)|\.symtab'; then
        fail "$arch: the shipped binary still has debug info or its symbol table"
    elif ! readelf -S "$debug" 2> /dev/null | grep -q "\.debug_line" || ! readelf -S "$debug" 2> /dev/null | grep -q "\.symtab"; then
        fail "$arch: $debug lacks .debug_line or .symtab"
    elif [ -z "$(bid "$shipped")" ] || [ "$(bid "$shipped")" != "$(bid "$debug")" ]; then
        fail "$arch: build IDs differ: shipped $(bid "$shipped"), debug file $(bid "$debug")"
    elif ! readelf -p .gnu_debuglink "$shipped" 2> /dev/null | grep -qF "$(basename "$debug")"; then
        fail "$arch: the shipped binary's .gnu_debuglink does not name $(basename "$debug")"
    else
        pass "$arch: binary stripped ($(stat -c %s "$shipped") bytes); debug info and symbols beside the image ($(stat -c %s "$debug") bytes), build ID $(bid "$shipped")"
    fi
}
for arch in $ARCHES; do check_arch "$arch"; done

# Same inputs, same digest.
SOURCE_DATE_EPOCH=$(git -C "$ROOT" log -1 --format=%ct 2>/dev/null || echo 0)
export SOURCE_DATE_EPOCH
"$HERE/build.sh" "${BUILD_ARGS[@]}" --out "$WORK/again" > /dev/null
again=$(sed -n 's/^DIGEST=//p' "$WORK/again/image.env")
[ "$again" = "$DIGEST" ] && pass "rebuild gives the same index digest $DIGEST" ||
    fail "rebuild gave $again, first build $DIGEST"

echo "image: $NAME $DIGEST"
for arch in $ARCHES; do
    c=COMPRESSED_BYTES_$arch u=UNCOMPRESSED_BYTES_$arch b=BIN_BYTES_$arch
    awk -v arch="$arch" -v c="${!c}" -v u="${!u}" -v b="${!b}" 'BEGIN {
        printf "image: %s: %.1f MB compressed (layer + config + manifest), %.1f MB unpacked (binary %.1f MB)\n",
            arch, c / 1e6, u / 1e6, b / 1e6 }'
done
awk -v a="$(stat -c %s "$ARCHIVE")" -v s="$build_s" 'BEGIN { printf "image: oci-archive %.1f MB; build %s s\n", a / 1e6, s }'
echo "image: $PASSED passed, $FAILED failed"
[ "$FAILED" = 0 ]
