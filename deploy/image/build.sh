#!/usr/bin/env bash
# Builds the plugin's multi-arch OCI image without a container engine: umoci lays one
# image per architecture (amd64, arm64) from a staged root filesystem into one OCI
# image layout, and an image index names both.
#
# Usage: deploy/image/build.sh [--bin PATH] [--bin-arm64 PATH] [--arch LIST] [--out DIR]
#                              [--print-name] [--no-manifests]
#   --bin PATH        the amd64 vfio-gpu-dra binary to ship (default: <target>/dist/vfio-gpu-dra,
#                     built by deploy/image/build-bin.sh amd64 when absent; <target> is
#                     $CARGO_TARGET_DIR, else target/)
#   --bin-arm64 PATH  the arm64 binary (default: <target>/aarch64-unknown-linux-gnu/dist/
#                     vfio-gpu-dra, cross-built by build-bin.sh arm64 when absent)
#   --arch LIST       the architectures, "amd64 arm64" by default. Without --arch and
#                     --bin-arm64, a missing cross toolchain leaves arm64 out with a message;
#                     asked for explicitly, it is an error.
#   --out DIR         output directory (default: target/image)
#   --print-name      print the image name (localhost/vfio-gpu-dra:<workspace version>)
#                     and exit
#   --no-manifests    do not render deploy/ (below; it needs Go and Helm's Go packages)
#
# Output in DIR:
#   oci/                          OCI image layout: index.json names one image index
#                                 (tag <version>) holding a manifest per architecture
#   vfio-gpu-dra-<version>.oci.tar   the same as an oci-archive (for `ctr images import`,
#                                    `skopeo copy --all oci-archive:...`)
#   vfio-gpu-dra-<version>.<arch>.debug   the symbols and debug info stripped from that
#                                 architecture's binary (found by build ID / .gnu_debuglink)
#   deploy/*.yaml                 the chart's manifests (deploy/helm/render.sh's) with
#                                 image.digest set: the DaemonSet runs
#                                 localhost/vfio-gpu-dra@sha256:<this build's index digest>
#   image.env                     NAME, TAG, DIGEST, ARCHES, per architecture its manifest
#                                 digest and sizes, MANIFESTS (for scripts)
#
# Each root filesystem holds only: the stripped binary, /usr/sbin/chroot (the engine
# runs the host's modprobe and nvidia-smi as `chroot <host-root> PROG`), the shared
# libraries those two load, their Debian copyright files, and an empty /tmp. amd64
# takes chroot and the libraries from this build machine (the binary's own glibc);
# arm64 takes them from Debian's arm64 packages (coreutils, libc6, libgcc-s1), fetched
# once with apt-get into <target>/image-cache/ (delete it to refresh). Timestamps come
# from SOURCE_DATE_EPOCH (default: the last commit's time), so equal inputs give an
# equal image digest. Needs root (files owned by root in the layers), umoci (installed
# with apt-get when missing), binutils (and binutils-aarch64-linux-gnu for arm64) and
# python3.
set -euo pipefail
shopt -s inherit_errexit
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
case "$TARGET" in /*) ;; *) TARGET=$ROOT/$TARGET ;; esac

BIN_AMD64=""
BIN_ARM64=""
ARCHES=""
OUT="$ROOT/target/image"
PRINT_NAME=0
MANIFESTS_ON=1
while [ $# -gt 0 ]; do
    case "$1" in
    --bin) BIN_AMD64=$2; shift 2 ;;
    --bin-arm64) BIN_ARM64=$2; shift 2 ;;
    --arch) ARCHES=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --print-name) PRINT_NAME=1; shift ;;
    --no-manifests) MANIFESTS_ON=0; shift ;;
    -h|--help) sed -n '2,43p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

# The workspace version (Cargo.toml [workspace.package]) names the image.
VERSION=$(awk '/^\[workspace.package\]/ { p = 1; next } /^\[/ { p = 0 }
               p && /^version *=/ { gsub(/[" ]/, "", $0); sub(/^version=/, "", $0); print; exit }' "$ROOT/Cargo.toml")
[ -n "$VERSION" ] || { echo "build.sh: no version in [workspace.package]" >&2; exit 1; }
REPO=localhost/vfio-gpu-dra
NAME=$REPO:$VERSION
if [ $PRINT_NAME = 1 ]; then echo "$NAME"; exit 0; fi

log() { echo "image: $*" >&2; }

# Which architectures: arm64 only when its toolchain is here, unless asked for by name.
if [ -z "$ARCHES" ]; then
    ARCHES="amd64 arm64"
    if [ -z "$BIN_ARM64" ] && ! "$HERE/build-bin.sh" --check arm64; then
        log "arm64 LEFT OUT: no cross toolchain (apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user; rustup target add aarch64-unknown-linux-gnu); the index holds amd64 only"
        ARCHES=amd64
    fi
fi
for arch in $ARCHES; do
    case "$arch" in amd64|arm64) ;; *) echo "build.sh: unknown architecture $arch (amd64, arm64)" >&2; exit 2 ;; esac
done

for tool in strip objcopy readelf python3; do
    command -v "$tool" > /dev/null || { echo "build.sh: $tool not found" >&2; exit 1; }
done
if ! command -v umoci > /dev/null; then
    log "installing umoci"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends umoci > /dev/null 2>&1 ||
        { apt-get update -qq && apt-get install -y -qq --no-install-recommends umoci > /dev/null; }
fi

# The binary of each architecture, built when not given. Checked before anything is
# written: the right machine, and the workspace's version (amd64 runs it; arm64 only
# when qemu-user is here, test.sh runs it in any case).
declare -A BIN=([amd64]=$BIN_AMD64 [arm64]=$BIN_ARM64)
declare -A ELF_MACHINE=([amd64]="Advanced Micro Devices X86-64" [arm64]="AArch64")
for arch in $ARCHES; do
    if [ -z "${BIN[$arch]}" ]; then
        log "building the $arch binary (deploy/image/build-bin.sh $arch)"
        BIN[$arch]=$("$HERE/build-bin.sh" "$arch")
    fi
    b=${BIN[$arch]}
    [ -x "$b" ] || { echo "build.sh: $b is not an executable" >&2; exit 1; }
    machine=$(readelf -h "$b" | sed -n 's/^ *Machine: *//p')
    [ "$machine" = "${ELF_MACHINE[$arch]}" ] ||
        { echo "build.sh: $b is for '$machine', not $arch" >&2; exit 1; }
    if [ "$arch" = amd64 ]; then
        v=$("$b" --version)
        [ "$v" = "vfio-gpu-dra $VERSION" ] ||
            { echo "build.sh: $b says '$v', the workspace is $VERSION" >&2; exit 1; }
    fi
done

EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$ROOT" log -1 --format=%ct 2>/dev/null || echo 0)}
CREATED=$(date -u -d "@$EPOCH" +%Y-%m-%dT%H:%M:%SZ)
REVISION=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)
SOURCE=$(awk -F'"' '/^repository *=/ { print $2; exit }' "$ROOT/Cargo.toml")

# Debian's arm64 packages that give the arm64 image its chroot and libraries, fetched
# with an apt configuration of its own (its own lists and cache, architecture arm64), so
# the build machine's apt state is left alone; apt checks them against the signed lists.
# (gcc-12-base holds libgcc-s1's copyright file, which libgcc-s1 links to.)
ARM64_DEBS="coreutils libc6 libgcc-s1 gcc-12-base"
ARM64_SYSROOT=""
fetch_arm64_sysroot() {
    local cache=$TARGET/image-cache/debian-arm64
    if [ ! -f "$cache/complete" ]; then
        log "fetching Debian arm64 packages ($ARM64_DEBS) into $cache"
        rm -rf "$cache"
        mkdir -p "$cache/lists/partial" "$cache/archives/partial" "$cache/debs"
        local apt=(-o "Dir::State::Lists=$cache/lists" -o "Dir::Cache=$cache" -o "Dir::Cache::archives=$cache/archives"
            -o APT::Architecture=arm64 -o "APT::Architectures::=arm64" -o APT::Sandbox::User=root)
        apt-get "${apt[@]}" -qq update >&2
        local pkg
        for pkg in $ARM64_DEBS; do
            (cd "$cache/debs" && apt-get "${apt[@]}" -qq download "$pkg:arm64") >&2
            mkdir -p "$cache/root/$pkg"
            dpkg-deb -x "$cache/debs/${pkg}"_*_arm64.deb "$cache/root/$pkg"
        done
        rm -rf "$cache/lists" "$cache/archives"
        touch "$cache/complete"
    fi
    ARM64_SYSROOT=$cache/root
}

# The copyright file of PKG among the package trees under SYSROOT: its own, or the one
# of the package its doc directory links to (Debian's libgcc-s1 -> gcc-12-base).
arm64_copyright() {
    local sysroot=$1 pkg=$2 doc owner
    doc=$sysroot/$pkg/usr/share/doc/$pkg
    if [ -L "$doc" ]; then
        for owner in $ARM64_DEBS; do
            [ -f "$sysroot/$owner/usr/share/doc/$(readlink "$doc")/copyright" ] &&
                { echo "$sysroot/$owner/usr/share/doc/$(readlink "$doc")/copyright"; return; }
        done
    fi
    [ -f "$doc/copyright" ] || { echo "build.sh: no copyright file for the arm64 package $pkg" >&2; exit 1; }
    echo "$doc/copyright"
}

# Copies FILE's shared libraries (and theirs) from the package trees under SYSROOT
# (one directory per Debian package) to STAGE at the paths the loader looks in, with
# each package's copyright file.
stage_cross_libs() {
    local sysroot=$1 stage=$2 triple=$3
    shift 3
    local todo=("$@") done_libs=" " f lib src pkg interp
    while [ ${#todo[@]} -gt 0 ]; do
        f=${todo[0]}
        todo=("${todo[@]:1}")
        interp=$(readelf -l "$f" 2> /dev/null | sed -n 's/.*Requesting program interpreter: \(.*\)\]$/\1/p')
        for lib in $(readelf -d "$f" | sed -n 's/.*Shared library: \[\(.*\)\]$/\1/p') ${interp:+"$interp"}; do
            # The interpreter's absolute path links to the one copy in the multiarch
            # directory, as on a Debian arm64 system.
            case "$lib" in
            /*) mkdir -p "$(dirname "$stage$lib")"
                ln -sfn "$(realpath -m --relative-to="$(dirname "$stage$lib")" "$stage/usr/lib/$triple/${lib##*/}")" "$stage$lib"
                lib=${lib##*/} ;;
            esac
            case "$done_libs" in *" $lib "*) continue ;; esac
            done_libs="$done_libs$lib "
            src=""
            for pkg in $ARM64_DEBS; do
                for dir in "lib/$triple" "usr/lib/$triple"; do
                    [ -e "$sysroot/$pkg/$dir/${lib##*/}" ] && { src=$sysroot/$pkg/$dir/${lib##*/}; break 2; }
                done
            done
            [ -n "$src" ] || { echo "build.sh: $lib (needed by $f) is in none of $ARM64_DEBS" >&2; exit 1; }
            dest=$stage/usr/lib/$triple/$lib
            mkdir -p "$(dirname "$dest")"
            cp -L "$src" "$dest"
            mkdir -p "$stage/usr/share/doc/$pkg"
            cp "$(arm64_copyright "$sysroot" "$pkg")" "$stage/usr/share/doc/$pkg/copyright"
            todo+=("$src")
        done
    done
}

# Stages ARCH's root filesystem in STAGE and writes the debug file DEBUG.
stage_rootfs() {
    local arch=$1 bin=$2 stage=$3 debug=$4
    local tools="" chroot_bin
    [ "$arch" = arm64 ] && tools=aarch64-linux-gnu-
    mkdir -p "$stage"/usr/bin "$stage"/usr/sbin "$stage"/usr/lib "$stage"/usr/lib64 "$stage"/tmp "$stage"/etc
    chmod 1777 "$stage/tmp"
    # Debian's merged /usr: the ELF interpreter is /lib64/ld-linux-x86-64.so.2 or
    # /lib/ld-linux-aarch64.so.1, ldd reports /lib/... paths.
    for d in bin sbin lib lib64; do ln -s "usr/$d" "$stage/$d"; done

    # The binary without its symbols and DWARF (the release profile keeps line tables);
    # both go to DEBUG beside the image, linked by build ID and .gnu_debuglink.
    "${tools}objcopy" --only-keep-debug "$bin" "$debug"
    "${tools}strip" --strip-all --remove-section=.gnu_debuglink -o "$stage/usr/bin/vfio-gpu-dra" "$bin"
    "${tools}objcopy" --add-gnu-debuglink="$debug" "$stage/usr/bin/vfio-gpu-dra"
    chmod 0755 "$stage/usr/bin/vfio-gpu-dra"

    if [ "$arch" = amd64 ]; then
        chroot_bin=$(command -v chroot)
        cp -L "$chroot_bin" "$stage/usr/sbin/chroot"
        # Shared libraries, at the paths ldd reports (resolved into usr/ by the links).
        local libs lib dest f pkg
        libs=$( { ldd "$bin"; ldd "$chroot_bin"; } | grep -o '/[^ ]*' | sort -u)
        for lib in $libs; do
            dest=$stage$lib
            mkdir -p "$(dirname "$dest")"
            cp -L "$lib" "$dest"
        done
        # Their licences: the copyright file of each Debian package shipping one.
        for f in $libs "$chroot_bin"; do
            # dpkg knows a file by the path its package ships (/lib/... or /usr/lib/...).
            pkg=$( { dpkg -S "$f" || dpkg -S "$(readlink -f "$f")"; } 2>/dev/null | head -1 | cut -d: -f1) || true
            [ -n "$pkg" ] && [ -f "/usr/share/doc/$pkg/copyright" ] || continue
            mkdir -p "$stage/usr/share/doc/$pkg"
            cp "/usr/share/doc/$pkg/copyright" "$stage/usr/share/doc/$pkg/copyright"
        done
    else
        fetch_arm64_sysroot
        local sysroot=$ARM64_SYSROOT
        cp -L "$sysroot/coreutils/usr/sbin/chroot" "$stage/usr/sbin/chroot"
        mkdir -p "$stage/usr/share/doc/coreutils"
        cp "$sysroot/coreutils/usr/share/doc/coreutils/copyright" "$stage/usr/share/doc/coreutils/copyright"
        stage_cross_libs "$sysroot" "$stage" aarch64-linux-gnu "$bin" "$stage/usr/sbin/chroot"
    fi
    mkdir -p "$stage/usr/share/doc/vfio-gpu-dra"
    cp "$ROOT/LICENSE" "$stage/usr/share/doc/vfio-gpu-dra/LICENSE"

    chown -R 0:0 "$stage"
    find "$stage" -depth -exec touch -h -d "@$EPOCH" {} +
}

rm -rf "$OUT"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
L=$OUT/oci
umoci init --layout "$L"
declare -A UNCOMPRESSED STRIPPED DEBUGS
for arch in $ARCHES; do
    stage=$OUT/rootfs-$arch
    DEBUGS[$arch]=$OUT/vfio-gpu-dra-$VERSION.$arch.debug
    stage_rootfs "$arch" "${BIN[$arch]}" "$stage" "${DEBUGS[$arch]}"
    STRIPPED[$arch]=$(stat -c %s "$stage/usr/bin/vfio-gpu-dra")
    # Unpacked size: the regular files of the root filesystem.
    UNCOMPRESSED[$arch]=$(find "$stage" -type f -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }')

    # The image: one layer with the whole staged root, under a per-architecture tag
    # that the index below replaces.
    umoci new --image "$L:$VERSION-$arch"
    umoci insert --image "$L:$VERSION-$arch" --history.created "$CREATED" \
        --history.created_by "deploy/image/build.sh" "$stage" /
    umoci config --image "$L:$VERSION-$arch" --created "$CREATED" \
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
    rm -rf "$stage"
done
umoci gc --layout "$L"

# One image index over the per-architecture manifests, each with its platform (from
# its own config, so the two cannot disagree); index.json then names only that index,
# tagged <version>, with the name containerd gives an imported image (ref.name holds
# the tag only, and `ctr images import` would otherwise need --base-name). Prints the
# index digest, then per architecture: arch, manifest digest, compressed size.
INDEX_OUT=$(python3 - "$L" "$NAME" "$VERSION" "$CREATED" "$REVISION" $ARCHES <<'PY'
import hashlib, json, os, sys
layout, name, version, created, revision, arches = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6:]
INDEX = "application/vnd.oci.image.index.v1+json"
def blob_path(digest):
    return os.path.join(layout, "blobs", *digest.split(":"))
def read_blob(digest):
    with open(blob_path(digest), "rb") as f:
        return json.load(f)
def canonical(obj):
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
with open(os.path.join(layout, "index.json")) as f:
    top = json.load(f)
by_tag = {m["annotations"]["org.opencontainers.image.ref.name"]: m for m in top["manifests"]}
manifests, lines = [], []
for arch in arches:
    desc = dict(by_tag[f"{version}-{arch}"])
    desc.pop("annotations", None)
    manifest = read_blob(desc["digest"])
    config = read_blob(manifest["config"]["digest"])
    desc["platform"] = {"architecture": config["architecture"], "os": config["os"]}
    manifests.append(desc)
    compressed = desc["size"] + manifest["config"]["size"] + sum(l["size"] for l in manifest["layers"])
    lines.append(f"{arch} {desc['digest']} {compressed}")
index = {
    "schemaVersion": 2,
    "mediaType": INDEX,
    "manifests": manifests,
    "annotations": {
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.revision": revision,
        "org.opencontainers.image.created": created,
    },
}
data = canonical(index)
digest = "sha256:" + hashlib.sha256(data).hexdigest()
with open(blob_path(digest), "wb") as f:
    f.write(data)
top["manifests"] = [{
    "mediaType": INDEX,
    "digest": digest,
    "size": len(data),
    "annotations": {
        "org.opencontainers.image.ref.name": version,
        "io.containerd.image.name": name,
    },
}]
with open(os.path.join(layout, "index.json"), "wb") as f:
    f.write(canonical(top))
print(digest)
print("\n".join(lines))
PY
)
DIGEST=$(head -1 <<< "$INDEX_OUT")
find "$L" -depth -exec touch -h -d "@$EPOCH" {} +
ARCHIVE=$OUT/vfio-gpu-dra-$VERSION.oci.tar
tar --sort=name --mtime="@$EPOCH" --owner=0 --group=0 --numeric-owner \
    -C "$L" -cf "$ARCHIVE" .

# The manifests to deploy this very build: the chart rendered with image.digest, so
# the DaemonSet names the image by content (repository@sha256:...), not by a tag
# that can be moved (security review M4).
MANIFESTS=
if [ $MANIFESTS_ON = 1 ]; then
    command -v go > /dev/null ||
        { echo "build.sh: go not found: it renders $OUT/deploy (or pass --no-manifests)" >&2; exit 1; }
    MANIFESTS=$OUT/deploy
    mkdir -p "$MANIFESTS"
    (cd "$ROOT/tests/k8s/helmrender" && go run . -chart "$ROOT/deploy/helm/vfio-gpu-dra" -out "$MANIFESTS" \
        -set "image.repository=$REPO" -set "image.digest=$DIGEST") >&2
    for f in "$MANIFESTS"/*.yaml; do
        { echo "# Pinned by deploy/image/build.sh: image.digest=$DIGEST ($NAME)"; cat "$f"; } > "$f.new"
        mv "$f.new" "$f"
    done
    log "manifests pinned to $REPO@$DIGEST in $MANIFESTS"
fi
{
    echo "NAME=$NAME"
    echo "TAG=$VERSION"
    echo "DIGEST=$DIGEST"
    echo "ARCHES=\"$ARCHES\""
    echo "MANIFESTS=$MANIFESTS"
    echo "LAYOUT=$L"
    echo "ARCHIVE=$ARCHIVE"
    # Per architecture (upper case): manifest digest, layer + config + manifest bytes,
    # unpacked root filesystem bytes, the shipped (stripped) binary, its debug file.
    while read -r arch manifest compressed; do
        A=${arch^^}
        echo "MANIFEST_$A=$manifest"
        echo "COMPRESSED_BYTES_$A=$compressed"
        echo "UNCOMPRESSED_BYTES_$A=${UNCOMPRESSED[$arch]}"
        echo "STRIPPED_BYTES_$A=${STRIPPED[$arch]}"
        echo "BINARY_$A=${BIN[$arch]}"
        echo "DEBUG_$A=${DEBUGS[$arch]}"
        log "$arch $manifest: $compressed bytes compressed, ${UNCOMPRESSED[$arch]} unpacked (binary ${STRIPPED[$arch]} stripped)"
    done < <(tail -n +2 <<< "$INDEX_OUT")
} > "$OUT/image.env"
log "$NAME $DIGEST (index: $ARCHES)"
echo "$NAME"
