#!/usr/bin/env bash
# Builds the plugin's multi-arch OCI image (linux/amd64 and linux/arm64) without a
# container engine: umoci lays one image per architecture from a staged root
# filesystem, then this script writes the OCI image index that names both.
#
# Usage: deploy/image/build.sh [--bin PATH] [--bin-arm64 PATH] [--arch LIST] [--out DIR] [--print-name]
#   --bin PATH        the amd64 vfio-gpu-dra binary (default: <target>/release/vfio-gpu-dra,
#                     built with `cargo build --release -p vfio-gpu-dra` when absent).
#                     CI passes the release binary it built once for the VM tests too.
#   --bin-arm64 PATH  the arm64 binary (default: <target>/aarch64-unknown-linux-gnu/release/
#                     vfio-gpu-dra, cross-built by deploy/image/cross-build.sh when absent)
#   --arch LIST       the architectures, space-separated (default: "amd64 arm64")
#   --out DIR         output directory (default: <target>/image)
#   --print-name      print the image name (localhost/vfio-gpu-dra:<workspace version>)
#                     and exit
#   <target> is $CARGO_TARGET_DIR, else target/.
#
# Output in DIR:
#   oci/                                 OCI image layout; tag <version> is the image index
#   vfio-gpu-dra-<version>.oci.tar       the same as an oci-archive (for `ctr images import`,
#                                        `skopeo copy --all oci-archive:...`)
#   vfio-gpu-dra-<version>-<arch>.debug  the debug info stripped from each shipped binary
#                                        (found by build ID / .gnu_debuglink)
#   image.env                            NAME, TAG, DIGEST (the index), per-arch digests,
#                                        sizes and paths (for scripts)
#
# Each architecture's root filesystem holds only: the stripped binary, /usr/sbin/chroot
# (the engine runs the host's modprobe and nvidia-smi as `chroot <host-root> PROG`), the
# shared libraries those two load, their Debian copyright files, the licence and an
# empty /tmp. amd64 takes chroot and the libraries from this (Debian, amd64) build
# machine; arm64 from Debian's own arm64 packages of the same release (libc6, libgcc-s1,
# coreutils), fetched with apt-get into a private cache (the machine's dpkg state is not
# touched). Timestamps come from SOURCE_DATE_EPOCH (default: the last commit's time), so
# equal inputs give an equal image digest. Needs root (files owned by root in the
# layers), umoci (installed with apt-get when missing), binutils (+ the aarch64 ones for
# arm64), readelf and python3.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
case "$TARGET" in /*) ;; *) TARGET=$ROOT/$TARGET ;; esac

BIN_amd64=""
BIN_arm64=""
ARCHES="amd64 arm64"
OUT="$TARGET/image"
PRINT_NAME=0
while [ $# -gt 0 ]; do
    case "$1" in
    --bin) BIN_amd64=$2; shift 2 ;;
    --bin-arm64) BIN_arm64=$2; shift 2 ;;
    --arch) ARCHES=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --print-name) PRINT_NAME=1; shift ;;
    -h|--help) sed -n '2,35p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
for arch in $ARCHES; do
    case "$arch" in amd64|arm64) ;; *) echo "build.sh: unknown architecture $arch (amd64, arm64)" >&2; exit 2 ;; esac
done
[ -n "${ARCHES// /}" ] || { echo "build.sh: --arch is empty" >&2; exit 2; }

# The workspace version (Cargo.toml [workspace.package]) names the image.
VERSION=$(awk '/^\[workspace.package\]/ { p = 1; next } /^\[/ { p = 0 }
               p && /^version *=/ { gsub(/[" ]/, "", $0); sub(/^version=/, "", $0); print; exit }' "$ROOT/Cargo.toml")
[ -n "$VERSION" ] || { echo "build.sh: no version in [workspace.package]" >&2; exit 1; }
REPO=localhost/vfio-gpu-dra
NAME=$REPO:$VERSION
if [ $PRINT_NAME = 1 ]; then echo "$NAME"; exit 0; fi

log() { echo "image: $*" >&2; }
apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "$@" > /dev/null 2>&1 ||
        { apt-get update -qq && apt-get install -y -qq --no-install-recommends "$@" > /dev/null; }
}
for tool in strip objcopy readelf python3; do
    command -v "$tool" > /dev/null || { echo "build.sh: $tool not found" >&2; exit 1; }
done
command -v umoci > /dev/null || { log "installing umoci"; apt_install umoci; }

# Per architecture: the Rust target, the Debian multiarch triplet, binutils' prefix.
rust_target() { case "$1" in amd64) echo x86_64-unknown-linux-gnu ;; arm64) echo aarch64-unknown-linux-gnu ;; esac; }
triplet() { case "$1" in amd64) echo x86_64-linux-gnu ;; arm64) echo aarch64-linux-gnu ;; esac; }
tool() { case "$1" in amd64) echo "$2" ;; arm64) echo "aarch64-linux-gnu-$2" ;; esac; }

# The sysroot chroot and the libraries come from: / for amd64 (this machine), Debian's
# arm64 packages otherwise. apt-get runs with its own lists and cache under
# <target>/image-cache, verifying the archive's signatures as usual.
SYSROOT_PACKAGES="libc6 libgcc-s1 coreutils"
sysroot() {
    local arch=$1
    if [ "$arch" = amd64 ]; then echo /; return; fi
    local cache=$TARGET/image-cache/$arch
    local dir=$cache/sysroot
    if [ ! -f "$dir/.complete" ]; then
        log "fetching Debian's $arch packages: $SYSROOT_PACKAGES"
        rm -rf "$dir" "$cache/debs"
        mkdir -p "$cache/apt/lists/partial" "$cache/apt/archives/partial" "$cache/debs" "$dir"
        local opts=(-q -o "APT::Architecture=$arch" -o "APT::Architectures::=$arch"
            -o "Dir::State::Lists=$cache/apt/lists" -o "Dir::Cache=$cache/apt"
            -o "Dir::State::status=/dev/null" -o "APT::Sandbox::User=root")
        apt-get "${opts[@]}" update > "$cache/apt.log" 2>&1 ||
            { cat "$cache/apt.log" >&2; exit 1; }
        local pkgs=()
        for p in $SYSROOT_PACKAGES; do pkgs+=("$p:$arch"); done
        (cd "$cache/debs" && apt-get "${opts[@]}" download "${pkgs[@]}" >> "$cache/apt.log" 2>&1) ||
            { cat "$cache/apt.log" >&2; exit 1; }
        for deb in "$cache"/debs/*.deb; do dpkg-deb -x "$deb" "$dir"; done
        touch "$dir/.complete"
    fi
    echo "$dir"
}

# The libraries an ELF file loads, as absolute paths in the image: its interpreter and
# its NEEDED entries (recursively), found in the Debian multiarch directories of SYSROOT.
needed_libs() {
    local elf=$1 sysroot=$2 trip=$3
    python3 - "$elf" "$sysroot" "$trip" <<'PY'
import os, subprocess, sys
elf, sysroot, trip = sys.argv[1], sys.argv[2], sys.argv[3]
dirs = [f"/lib/{trip}", f"/usr/lib/{trip}", "/lib", "/usr/lib"]
def readelf(args, path):
    return subprocess.run(["readelf", "-W", *args, path], check=True, capture_output=True, text=True).stdout
def host(path):
    return os.path.join(sysroot, path.lstrip("/"))
found, todo, interp = set(), [elf], None
for line in readelf(["-l"], elf).splitlines():
    if "Requesting program interpreter:" in line:
        interp = line.split(":", 1)[1].strip(" ]")
        found.add(interp)
while todo:
    for line in readelf(["-d"], todo.pop()).splitlines():
        if "(NEEDED)" not in line:
            continue
        name = line.split("[", 1)[1].rstrip("]")
        if interp and name == os.path.basename(interp):
            continue  # libc names the loader, already at the interpreter's path
        for d in dirs:
            if os.path.exists(host(f"{d}/{name}")):
                path = f"{d}/{name}"
                break
        else:
            sys.exit(f"build.sh: {name} (needed by {elf}) is in none of {dirs} under {sysroot}")
        if path not in found:
            found.add(path)
            todo.append(host(path))
print("\n".join(sorted(found)))
PY
}

# The Debian package shipping PATH under SYSROOT, whose copyright file goes along.
package_of() {
    local path=$1 sysroot=$2
    if [ "$sysroot" = / ]; then
        # dpkg knows a file by the path its package ships (/lib/... or /usr/lib/...).
        { dpkg -S "$path" || dpkg -S "$(readlink -f "$path")"; } 2> /dev/null | head -1 | cut -d: -f1
    else
        # The sysroot holds only the packages fetched; each one's doc directory is there.
        local pkg
        for pkg in $SYSROOT_PACKAGES; do
            [ -f "$sysroot/usr/share/doc/$pkg/copyright" ] || continue
            case "$pkg:$path" in
            coreutils:*/chroot | libgcc-s1:*libgcc_s* | libc6:*/ld-linux* | libc6:*/libc.so* | libc6:*/libm.so*)
                echo "$pkg"; return ;;
            esac
        done
    fi
}

EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$ROOT" log -1 --format=%ct 2>/dev/null || echo 0)}
CREATED=$(date -u -d "@$EPOCH" +%Y-%m-%dT%H:%M:%SZ)
REVISION=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)
SOURCE=$(awk -F'"' '/^repository *=/ { print $2; exit }' "$ROOT/Cargo.toml")

rm -rf "$OUT"
mkdir -p "$OUT"
L=$OUT/oci
umoci init --layout "$L"
ENV_LINES=()

# One architecture's image, tagged <version>-<arch> in the layout until the index names it.
build_arch() {
    local arch=$1 bin
    local trip; trip=$(triplet "$arch")
    local var=BIN_$arch
    bin=${!var}
    if [ -z "$bin" ]; then
        if [ "$arch" = amd64 ]; then bin=$TARGET/release/vfio-gpu-dra; else bin=$TARGET/$(rust_target "$arch")/release/vfio-gpu-dra; fi
        if [ ! -x "$bin" ]; then
            log "building $bin"
            if [ "$arch" = amd64 ]; then (cd "$ROOT" && cargo build -q --release -p vfio-gpu-dra); else "$HERE/cross-build.sh" > /dev/null; fi
        fi
    fi
    [ -x "$bin" ] || { echo "build.sh: $bin is not an executable" >&2; exit 1; }
    local machine
    machine=$(readelf -h "$bin" | awk -F: '/Machine:/ { gsub(/^ +/, "", $2); print $2 }')
    case "$arch:$machine" in
    amd64:*X86-64* | arm64:AArch64) ;;
    *) echo "build.sh: $bin is built for '$machine', not $arch" >&2; exit 1 ;;
    esac
    if [ "$arch" = amd64 ]; then
        local said
        said=$("$bin" --version)
        [ "$said" = "vfio-gpu-dra $VERSION" ] ||
            { echo "build.sh: $bin says '$said', the workspace is $VERSION" >&2; exit 1; }
    fi
    local sys; sys=$(sysroot "$arch")

    local stage=$OUT/rootfs-$arch
    rm -rf "$stage"
    mkdir -p "$stage"/usr/bin "$stage"/usr/sbin "$stage"/usr/lib "$stage"/tmp "$stage"/etc
    chmod 1777 "$stage/tmp"
    # Debian's merged /usr: the ELF interpreter is /lib64/ld-linux-x86-64.so.2 on amd64,
    # /lib/ld-linux-aarch64.so.1 on arm64, the libraries under /lib/<triplet>.
    if [ "$arch" = amd64 ]; then mkdir -p "$stage/usr/lib64"; fi
    for d in bin sbin lib lib64; do
        if [ -d "$stage/usr/$d" ]; then ln -s "usr/$d" "$stage/$d"; fi
    done

    # The binary stripped of everything it does not need to run (DWARF and the symbol
    # table: 5 MB); both go to the .debug file beside the image, linked by build ID and
    # .gnu_debuglink, so a backtrace's addresses resolve there (docs/image.md).
    local debug=$OUT/vfio-gpu-dra-$VERSION-$arch.debug
    "$(tool "$arch" objcopy)" --only-keep-debug "$bin" "$debug"
    "$(tool "$arch" strip)" --strip-all -o "$stage/usr/bin/vfio-gpu-dra" "$bin"
    "$(tool "$arch" objcopy)" --add-gnu-debuglink="$debug" "$stage/usr/bin/vfio-gpu-dra"
    chmod 0755 "$stage/usr/bin/vfio-gpu-dra" "$debug"
    local chroot_bin
    if [ "$sys" = / ]; then chroot_bin=$(command -v chroot); else chroot_bin=$sys/usr/sbin/chroot; fi
    cp -L "$chroot_bin" "$stage/usr/sbin/chroot"

    # Shared libraries at the paths the loader looks for (resolved into usr/ by the links).
    local libs
    libs=$( { needed_libs "$bin" "$sys" "$trip"; needed_libs "$chroot_bin" "$sys" "$trip"; } | sort -u)
    local lib pkg
    for lib in $libs; do
        mkdir -p "$(dirname "$stage$lib")"
        cp -L "${sys%/}$lib" "$stage$lib"
    done
    # Their licences: the copyright file of each Debian package shipping one.
    for lib in $libs /usr/sbin/chroot; do
        if [ "$sys" = / ] && [ "$lib" = /usr/sbin/chroot ]; then lib=$chroot_bin; fi
        pkg=$(package_of "${sys%/}$lib" "$sys") || true
        [ -n "$pkg" ] && [ -f "${sys%/}/usr/share/doc/$pkg/copyright" ] || continue
        mkdir -p "$stage/usr/share/doc/$pkg"
        cp "${sys%/}/usr/share/doc/$pkg/copyright" "$stage/usr/share/doc/$pkg/copyright"
    done
    mkdir -p "$stage/usr/share/doc/vfio-gpu-dra"
    cp "$ROOT/LICENSE" "$stage/usr/share/doc/vfio-gpu-dra/LICENSE"

    chown -R 0:0 "$stage"
    find "$stage" -depth -exec touch -h -d "@$EPOCH" {} +

    # One layer with the whole staged root.
    local tag=$VERSION-$arch
    umoci new --image "$L:$tag"
    umoci insert --image "$L:$tag" --history.created "$CREATED" \
        --history.created_by "deploy/image/build.sh" "$stage" /
    umoci config --image "$L:$tag" --created "$CREATED" \
        --history.created "$CREATED" --history.created_by "deploy/image/build.sh (config)" \
        --os linux --architecture "$arch" \
        --config.user 0:0 --config.workingdir / \
        --config.env PATH=/usr/sbin:/usr/bin \
        --config.entrypoint /usr/bin/vfio-gpu-dra --config.cmd --help \
        --config.label "org.opencontainers.image.title=vfio-gpu-dra" \
        --config.label "org.opencontainers.image.description=Kubernetes DRA kubelet plugin moving whole GPUs to vfio-pci for KubeVirt VMs" \
        --config.label "org.opencontainers.image.version=$VERSION" \
        --config.label "org.opencontainers.image.revision=$REVISION" \
        --config.label "org.opencontainers.image.source=$SOURCE" \
        --config.label "org.opencontainers.image.licenses=Apache-2.0" \
        --config.label "org.opencontainers.image.created=$CREATED" \
        --manifest.annotation "org.opencontainers.image.version=$VERSION" \
        --manifest.annotation "org.opencontainers.image.revision=$REVISION" \
        --manifest.annotation "org.opencontainers.image.created=$CREATED"

    # Unpacked size = the staged files (what a node's disk holds for this layer).
    local unpacked
    unpacked=$(find "$stage" -type f -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }')
    ENV_LINES+=("UNCOMPRESSED_BYTES_$arch=$unpacked" "DEBUG_$arch=$debug"
        "BIN_BYTES_$arch=$(stat -c %s "$stage/usr/bin/vfio-gpu-dra")")
    rm -rf "$stage"
}

for arch in $ARCHES; do build_arch "$arch"; done
umoci gc --layout "$L"

# The image index: one manifest per architecture with its platform, named <version>
# in index.json (a nested index, as `docker buildx` and `skopeo copy --all` lay it out).
# containerd names an imported image from io.containerd.image.name (ref.name holds the
# tag only, and `ctr images import` would otherwise need --base-name).
read -r DIGEST SIZES < <(python3 - "$L" "$VERSION" "$NAME" "$REVISION" "$CREATED" <<'PY'
import hashlib, json, os, sys
layout, version, name, revision, created = sys.argv[1:6]
index_path = os.path.join(layout, "index.json")
with open(index_path) as f:
    top = json.load(f)
def blob_path(digest):
    return os.path.join(layout, "blobs", *digest.split(":"))
def load(d):
    with open(blob_path(d["digest"])) as f:
        return json.load(f)
def put(obj):
    data = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with open(blob_path(digest), "wb") as f:
        f.write(data)
    return digest, len(data)
entries, sizes = [], []
for m in sorted(top["manifests"], key=lambda m: m["annotations"]["org.opencontainers.image.ref.name"]):
    manifest = load(m)
    config = load(manifest["config"])
    platform = {"architecture": config["architecture"], "os": config["os"]}
    # umoci writes no variant; arm64 images are v8 (containerd's default for arm64).
    if config["architecture"] == "arm64":
        platform["variant"] = "v8"
    entries.append({"mediaType": m["mediaType"], "digest": m["digest"], "size": m["size"], "platform": platform})
    # Compressed = manifest + config + layers: what a node of that architecture pulls.
    pulled = m["size"] + manifest["config"]["size"] + sum(l["size"] for l in manifest["layers"])
    sizes.append(f'{config["architecture"]}:{m["digest"]}:{pulled}')
index = {
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.index.v1+json",
    "manifests": entries,
    "annotations": {
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.revision": revision,
        "org.opencontainers.image.created": created,
    },
}
digest, size = put(index)
top["manifests"] = [{
    "mediaType": "application/vnd.oci.image.index.v1+json",
    "digest": digest,
    "size": size,
    "annotations": {"org.opencontainers.image.ref.name": version, "io.containerd.image.name": name},
}]
with open(index_path, "w") as f:
    json.dump(top, f, separators=(",", ":"), sort_keys=True)
print(digest, ",".join(sizes))
PY
)
[ -n "$DIGEST" ] && [ -n "$SIZES" ] || { echo "build.sh: writing the image index failed" >&2; exit 1; }
find "$L" -depth -exec touch -h -d "@$EPOCH" {} +
ARCHIVE=$OUT/vfio-gpu-dra-$VERSION.oci.tar
tar --sort=name --mtime="@$EPOCH" --owner=0 --group=0 --numeric-owner \
    -C "$L" -cf "$ARCHIVE" .

{
    echo "NAME=$NAME"
    echo "TAG=$VERSION"
    echo "DIGEST=$DIGEST"
    echo "ARCHES=\"$ARCHES\""
    for entry in ${SIZES//,/ }; do
        IFS=: read -r arch algo hex pulled <<< "$entry"
        echo "DIGEST_$arch=$algo:$hex"
        echo "COMPRESSED_BYTES_$arch=$pulled"
    done
    printf '%s\n' "${ENV_LINES[@]}"
    echo "LAYOUT=$L"
    echo "ARCHIVE=$ARCHIVE"
} > "$OUT/image.env"
for arch in $ARCHES; do
    log "$arch: $(grep -E "^(COMPRESSED|UNCOMPRESSED)_BYTES_$arch=" "$OUT/image.env" | tr '\n' ' ')"
done
log "$NAME $DIGEST (index: $ARCHES)"
echo "$NAME"
