#!/usr/bin/env bash
# Builds the multi-arch OCI image (deploy/image/build.sh) and checks it: the index is
# well-formed (every blob matches its digest and size, one manifest per architecture
# whose platform is its config's), the DaemonSet references the built name and the
# manifests the build renders pin the index by digest. Then per architecture it
# unpacks the image with umoci and runs the shipped binary from the unpacked root
# filesystem as the image's config says (entrypoint, PATH): amd64 in a chroot, arm64
# under qemu-user with the image's root as its library root (qemu-aarch64 -L), so the
# image's own loader and libraries run it: --version, --help, devices --demo, the
# README's demo, and the image's chroot. Each architecture's image must be under
# MAX_UNPACKED_BYTES unpacked (default 20000000: 20 MB), its binary stripped with
# symbols and debug info beside the image. A second build must give the same digest.
# Prints each image's sizes.
#
# Usage: deploy/image/test.sh [build.sh arguments: --bin, --bin-arm64, --arch]
#        (needs root for chroot; arm64 needs qemu-user)
set -euo pipefail
shopt -s inherit_errexit
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
BUILD_ARGS=("$@")

[ "$(id -u)" = 0 ] || { echo "test.sh: needs root (chroot, root-owned layers)" >&2; exit 1; }
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
PASSED=0
FAILED=0
MAX_UNPACKED_BYTES=${MAX_UNPACKED_BYTES:-20000000}
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

# The layout: index.json names one image index, by tag and containerd name, holding
# one manifest per architecture; every blob reachable from it is what its digest says.
if index_report=$(python3 - "$LAYOUT" "$NAME" "$TAG" "$DIGEST" $ARCHES <<'PY'
import hashlib, json, os, sys
layout, name, tag, digest, arches = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
def blob(desc, media_type):
    assert desc["mediaType"] == media_type, f"{desc['digest']}: mediaType {desc['mediaType']}, expected {media_type}"
    algo, hexdigest = desc["digest"].split(":")
    with open(os.path.join(layout, "blobs", algo, hexdigest), "rb") as f:
        data = f.read()
    assert algo == "sha256" and hashlib.sha256(data).hexdigest() == hexdigest, f"{desc['digest']}: content does not match"
    assert len(data) == desc["size"], f"{desc['digest']}: {len(data)} bytes, descriptor says {desc['size']}"
    return data
with open(os.path.join(layout, "oci-layout")) as f:
    assert json.load(f)["imageLayoutVersion"] == "1.0.0"
with open(os.path.join(layout, "index.json")) as f:
    top = json.load(f)
assert top["schemaVersion"] == 2 and len(top["manifests"]) == 1, f"index.json: {len(top['manifests'])} entries, expected 1"
entry = top["manifests"][0]
ann = entry.get("annotations", {})
assert ann.get("io.containerd.image.name") == name and ann.get("org.opencontainers.image.ref.name") == tag, f"index.json annotations {ann}"
assert entry["digest"] == digest, f"index.json names {entry['digest']}, image.env {digest}"
index = json.loads(blob(entry, INDEX))
assert index["schemaVersion"] == 2 and index["mediaType"] == INDEX
platforms = []
for m in index["manifests"]:
    manifest = json.loads(blob(m, MANIFEST))
    config = json.loads(blob(manifest["config"], "application/vnd.oci.image.config.v1+json"))
    for layer in manifest["layers"]:
        blob(layer, "application/vnd.oci.image.layer.v1.tar+gzip")
    p = m["platform"]
    assert (p["os"], p["architecture"]) == (config["os"], config["architecture"]) == ("linux", p["architecture"]), \
        f"{m['digest']}: platform {p}, config {config['os']}/{config['architecture']}"
    platforms.append(p["architecture"])
assert sorted(platforms) == sorted(arches), f"index platforms {platforms}, expected {arches}"
print(" ".join(f"linux/{a}" for a in platforms))
PY
); then
    pass "index.json: image index $DIGEST named $NAME (containerd) and tag $TAG, manifests for $index_report, every blob matches its digest"
else
    fail "the OCI layout is malformed: $index_report"
fi

# Runs one architecture's entrypoint: amd64 in a chroot, arm64 under qemu-user rooted
# in the image (its loader, its libraries), both with only the image's environment.
run_in() {
    local arch=$1 rfs=$2
    shift 2
    if [ "$arch" = amd64 ]; then
        env -i "${ENVS[@]}" chroot "$rfs" "$@"
    else
        local prog=$1
        shift
        env -i "${ENVS[@]}" qemu-aarch64 -L "$rfs" "$rfs$prog" "$@"
    fi
}

# Unpacks ARCH's image as a runtime would (umoci on a view of the layout that tags
# that manifest alone) and checks it.
check_arch() {
    local arch=$1 A=${1^^}
    local view=$WORK/layout-$arch bundle=$WORK/bundle-$arch manifest_var=MANIFEST_$A
    local manifest=${!manifest_var}
    mkdir -p "$view"
    ln -s "$LAYOUT/blobs" "$view/blobs"
    cp "$LAYOUT/oci-layout" "$view/oci-layout"
    python3 - "$LAYOUT" "$manifest" "$arch" > "$view/index.json" <<'PY'
import json, os, sys
layout, digest, arch = sys.argv[1:]
with open(os.path.join(layout, "blobs", *json.load(open(os.path.join(layout, "index.json")))["manifests"][0]["digest"].split(":"))) as f:
    desc = next(m for m in json.load(f)["manifests"] if m["digest"] == digest)
desc["annotations"] = {"org.opencontainers.image.ref.name": arch}
print(json.dumps({"schemaVersion": 2, "manifests": [desc]}))
PY
    umoci unpack --image "$view:$arch" "$bundle" > /dev/null
    local rfs=$bundle/rootfs
    mapfile -t ENVS < <(python3 -c 'import json,sys; [print(e) for e in json.load(open(sys.argv[1]))["process"]["env"]]' "$bundle/config.json")
    mapfile -t ARGS < <(python3 -c 'import json,sys; [print(a) for a in json.load(open(sys.argv[1]))["process"]["args"]]' "$bundle/config.json")
    local entry=${ARGS[0]} triple interp
    case "$arch" in
    amd64) triple=x86_64-linux-gnu interp=/usr/lib64/ld-linux-x86-64.so.2 ;;
    arm64) triple=aarch64-linux-gnu interp=/usr/lib/ld-linux-aarch64.so.1 ;;
    esac

    # Before anything runs in it: nothing but the binary, chroot, the libraries they
    # load, licences and /tmp.
    local extra
    extra=$(cd "$rfs" && find . ! -type d ! -path './usr/bin/vfio-gpu-dra' ! -path './usr/sbin/chroot' \
        ! -path "./usr/lib/$triple/*.so*" ! -path ".$interp" \
        ! -path './usr/share/doc/*' ! -path './bin' ! -path './sbin' ! -path './lib' ! -path './lib64')
    [ -z "$extra" ] && pass "$arch: root filesystem holds only the binary, chroot, their libraries and licences: $(cd "$rfs" && find . ! -type d | sort | tr '\n' ' ')" ||
        fail "$arch: unexpected files in the image: $extra"

    local unpacked
    unpacked=$(find "$rfs" -type f -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }')
    [ "$unpacked" -lt "$MAX_UNPACKED_BYTES" ] && pass "$arch: $unpacked bytes unpacked, under $MAX_UNPACKED_BYTES" ||
        fail "$arch: $unpacked bytes unpacked, over the limit $MAX_UNPACKED_BYTES"

    # The binary is for this architecture, stripped of symbols and debug info, and
    # its debug file beside the image matches it (build ID, debug link).
    local shipped=$rfs/usr/bin/vfio-gpu-dra debug_var=DEBUG_$A machine
    local debug=${!debug_var}
    machine=$(readelf -h "$shipped" | sed -n 's/^ *Machine: *//p')
    bid() { readelf -n "$1" 2> /dev/null | awk '/Build ID/ { print $3 }'; }
    if [ "$machine" != "$(case $arch in amd64) echo 'Advanced Micro Devices X86-64' ;; arm64) echo AArch64 ;; esac)" ]; then
        fail "$arch: the shipped binary is for $machine"
    elif readelf -S "$shipped" | grep -qE '\.(debug_(info|line|str|abbrev|ranges|rnglists|loc|loclists|aranges|frame)|symtab)\b'; then
        fail "$arch: the shipped binary still has symbols or debug info"
    elif ! readelf -S "$debug" | grep -q '\.debug_line' || ! readelf -S "$debug" | grep -q '\.symtab'; then
        fail "$arch: $debug lacks .debug_line or .symtab"
    elif [ -z "$(bid "$shipped")" ] || [ "$(bid "$shipped")" != "$(bid "$debug")" ]; then
        fail "$arch: build IDs differ: shipped $(bid "$shipped"), debug file $(bid "$debug")"
    elif ! readelf --string-dump=.gnu_debuglink "$shipped" | grep -qF "${debug##*/}"; then
        fail "$arch: the shipped binary's .gnu_debuglink does not name ${debug##*/}"
    else
        pass "$arch: $machine binary stripped ($(stat -c %s "$shipped") bytes); symbols and debug info beside the image ($(stat -c %s "$debug") bytes), build ID $(bid "$shipped")"
    fi

    if [ "$arch" = arm64 ] && ! command -v qemu-aarch64 > /dev/null; then
        fail "arm64: qemu-aarch64 not found (apt-get install qemu-user): the arm64 binary cannot be run"
        return
    fi
    local how="chroot"
    [ "$arch" = arm64 ] && how="qemu-aarch64 -L <rootfs>"
    local out
    out=$(run_in "$arch" "$rfs" "$entry" --version 2>&1) && [ "$out" = "vfio-gpu-dra $TAG" ] &&
        pass "$arch ($how): $entry --version: $out" || fail "$arch ($how): $entry --version: $out"
    out=$(run_in "$arch" "$rfs" "$entry" --help 2>&1) && grep -q '^Usage: vfio-gpu-dra' <<< "$out" &&
        pass "$arch ($how): $entry --help" || fail "$arch ($how): $entry --help:"$'\n'"$out"
    if out=$(run_in "$arch" "$rfs" "$entry" devices --demo 2>&1); then
        local n
        n=$(grep -cE '^[[:xdigit:]]{4}:[[:xdigit:]]{2}:[[:xdigit:]]{2}\.[0-7] ' <<< "$out" || true)
        [ "$n" = 8 ] && pass "$arch ($how): devices --demo lists 8 GPUs" ||
            fail "$arch ($how): devices --demo listed $n GPU lines:"$'\n'"$out"
    else
        fail "$arch ($how): devices --demo failed:"$'\n'"$out"
    fi
    # The README's demo: the real plugin on Unix sockets, the in-process API server
    # and the kubelet emulator, prepare and unprepare. It counts its free file
    # descriptors in /proc, which a bare chroot lacks: amd64 runs it outside the chroot
    # with the image's own loader and libraries, as qemu-aarch64 -L does for arm64.
    local t0 secs
    t0=$(date +%s.%N)
    local demo_cmd=(run_in "$arch" "$rfs" "$entry" demo)
    local demo_how=$how
    if [ "$arch" = amd64 ]; then
        demo_cmd=(env -i "${ENVS[@]}" "$rfs$interp" --library-path "$rfs/usr/lib/$triple" "$rfs$entry" demo)
        demo_how="the image's ld.so and libraries"
    fi
    if out=$("${demo_cmd[@]}" 2>&1); then
        secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
        pass "$arch ($demo_how): demo exits 0 (${secs} s)"
    else
        fail "$arch ($demo_how): demo failed:"$'\n'"$out"
    fi
    if [ "$arch" = amd64 ]; then
        # The engine reaches the host's modprobe/nvidia-smi as `chroot <host-root> PROG`,
        # with chroot found on the image's PATH.
        out=$(run_in amd64 "$rfs" chroot / "$entry" --version 2>&1) && [ "$out" = "vfio-gpu-dra $TAG" ] &&
            pass "amd64 (chroot): the image's chroot runs (env: ${ENVS[*]})" || fail "amd64: chroot in the image: $out"
    else
        out=$(run_in arm64 "$rfs" /usr/sbin/chroot --version 2>&1) && grep -q '^chroot (GNU coreutils)' <<< "$out" &&
            pass "arm64 ($how): the image's chroot runs: $(head -1 <<< "$out")" || fail "arm64: chroot in the image: $out"
    fi
}

for arch in $ARCHES; do check_arch "$arch"; done
case " $ARCHES " in
*" arm64 "*) ;;
*) echo "image: SKIP arm64: not in this build (--arch, or no cross toolchain: see build.sh's message); CI builds it" ;;
esac

# Same inputs, same digest.
SOURCE_DATE_EPOCH=$(git -C "$ROOT" log -1 --format=%ct 2>/dev/null || echo 0)
export SOURCE_DATE_EPOCH
again_args=("${BUILD_ARGS[@]}" --arch "$ARCHES")
for arch in $ARCHES; do
    bin_var=BINARY_${arch^^}
    [ "$arch" = amd64 ] && again_args+=(--bin "${!bin_var}") || again_args+=(--bin-arm64 "${!bin_var}")
done
"$HERE/build.sh" "${again_args[@]}" --out "$WORK/again" > /dev/null
again=$(sed -n 's/^DIGEST=//p' "$WORK/again/image.env")
[ "$again" = "$DIGEST" ] && pass "rebuild gives the same digest $DIGEST" ||
    fail "rebuild gave $again, first build $DIGEST"

echo "image: $NAME $DIGEST (oci-archive $(awk -v a="$(stat -c %s "$ARCHIVE")" 'BEGIN { printf "%.1f MiB", a / 1048576 }'); build $build_s s)"
for arch in $ARCHES; do
    A=${arch^^}
    c=COMPRESSED_BYTES_$A u=UNCOMPRESSED_BYTES_$A st=STRIPPED_BYTES_$A b=BINARY_$A
    awk -v arch="$arch" -v c="${!c}" -v u="${!u}" -v st="${!st}" -v full="$(stat -c %s "${!b}")" 'BEGIN {
        printf "image: %s: %.1f MiB compressed (layer + config + manifest), %.1f MiB unpacked (%d bytes); binary %d bytes stripped, %d as built\n",
            arch, c / 1048576, u / 1048576, u, st, full }'
done
echo "image: $PASSED passed, $FAILED failed"
[ "$FAILED" = 0 ]
