#!/usr/bin/env bash
# Builds the plugin's OCI image without a container engine: umoci lays an OCI
# image layout from a staged root filesystem.
#
# Usage: deploy/image/build.sh [--bin PATH] [--out DIR] [--print-name] [--no-manifests]
#   --bin PATH    the vfio-gpu-dra binary to ship (default: target/release/vfio-gpu-dra,
#                 built with `cargo build --release -p vfio-gpu-dra` when absent).
#                 CI passes the release binary it built once for the VM tests too.
#   --out DIR     output directory (default: target/image)
#   --print-name  print the image name (localhost/vfio-gpu-dra:<workspace version>)
#                 and exit
#   --no-manifests  do not render deploy/ (below; it needs Go and Helm's Go packages)
#
# Output in DIR:
#   oci/                          OCI image layout, tag <version>
#   vfio-gpu-dra-<version>.oci.tar   the same as an oci-archive (for `ctr images import`,
#                                    `skopeo copy oci-archive:...`)
#   vfio-gpu-dra-<version>.debug     the debug info stripped from the shipped binary
#                                    (found by build ID / .gnu_debuglink)
#   deploy/*.yaml                 the chart's manifests (deploy/helm/render.sh's) with
#                                 image.digest set: the DaemonSet runs
#                                 localhost/vfio-gpu-dra@sha256:<this build's digest>
#   image.env                     NAME, TAG, DIGEST, MANIFESTS, sizes (for scripts)
#
# The root filesystem holds only: the binary stripped of debug info, /usr/sbin/chroot (the engine
# runs the host's modprobe and nvidia-smi as `chroot <host-root> PROG`), the shared
# libraries those two load (from this build machine: the binary's own glibc), their
# Debian copyright files, and an empty /tmp. Timestamps come from SOURCE_DATE_EPOCH
# (default: the last commit's time), so equal inputs give an equal image digest.
# Needs root (files owned by root in the layers), umoci (installed with apt-get when
# missing), binutils (strip, objcopy) and python3.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)

BIN=""
OUT="$ROOT/target/image"
PRINT_NAME=0
MANIFESTS_ON=1
while [ $# -gt 0 ]; do
    case "$1" in
    --bin) BIN=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --print-name) PRINT_NAME=1; shift ;;
    --no-manifests) MANIFESTS_ON=0; shift ;;
    -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
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
for tool in strip objcopy python3; do
    command -v "$tool" > /dev/null || { echo "build.sh: $tool not found" >&2; exit 1; }
done
if ! command -v umoci > /dev/null; then
    log "installing umoci"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends umoci > /dev/null 2>&1 ||
        { apt-get update -qq && apt-get install -y -qq --no-install-recommends umoci > /dev/null; }
fi

if [ -z "$BIN" ]; then
    BIN=$ROOT/target/release/vfio-gpu-dra
    if [ ! -x "$BIN" ]; then
        log "building $BIN"
        (cd "$ROOT" && cargo build -q --release -p vfio-gpu-dra)
    fi
fi
[ -x "$BIN" ] || { echo "build.sh: $BIN is not an executable" >&2; exit 1; }
BIN_VERSION=$("$BIN" --version)
[ "$BIN_VERSION" = "vfio-gpu-dra $VERSION" ] ||
    { echo "build.sh: $BIN says '$BIN_VERSION', the workspace is $VERSION" >&2; exit 1; }

EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$ROOT" log -1 --format=%ct 2>/dev/null || echo 0)}
CREATED=$(date -u -d "@$EPOCH" +%Y-%m-%dT%H:%M:%SZ)
REVISION=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)
SOURCE=$(awk -F'"' '/^repository *=/ { print $2; exit }' "$ROOT/Cargo.toml")

rm -rf "$OUT"
mkdir -p "$OUT"
STAGE=$OUT/rootfs
mkdir -p "$STAGE"/usr/bin "$STAGE"/usr/sbin "$STAGE"/usr/lib "$STAGE"/usr/lib64 "$STAGE"/tmp "$STAGE"/etc
chmod 1777 "$STAGE/tmp"
# Debian's merged /usr: the ELF interpreter is /lib64/ld-linux-x86-64.so.2 and ldd
# reports /lib/... paths.
for d in bin sbin lib lib64; do ln -s "usr/$d" "$STAGE/$d"; done

# The binary without its DWARF (release keeps line tables: 100+ MB); they go beside
# the image. The symbol table stays (+5 MB, +1 MB compressed) so a backtrace in the
# pod's log names its functions; file:line come from the .debug file.
DEBUG=$OUT/vfio-gpu-dra-$VERSION.debug
objcopy --only-keep-debug "$BIN" "$DEBUG"
strip --strip-debug -o "$STAGE/usr/bin/vfio-gpu-dra" "$BIN"
objcopy --add-gnu-debuglink="$DEBUG" "$STAGE/usr/bin/vfio-gpu-dra"
chmod 0755 "$STAGE/usr/bin/vfio-gpu-dra"
CHROOT=$(command -v chroot)
cp -L "$CHROOT" "$STAGE/usr/sbin/chroot"

# Shared libraries, at the paths ldd reports (resolved into usr/ by the links).
libs=$( { ldd "$BIN"; ldd "$CHROOT"; } | grep -o '/[^ ]*' | sort -u)
for lib in $libs; do
    dest=$STAGE$lib
    mkdir -p "$(dirname "$dest")"
    cp -L "$lib" "$dest"
done
# Their licences: the copyright file of each Debian package shipping one.
for f in $libs "$CHROOT"; do
    # dpkg knows a file by the path its package ships (/lib/... or /usr/lib/...).
    pkg=$( { dpkg -S "$f" || dpkg -S "$(readlink -f "$f")"; } 2>/dev/null | head -1 | cut -d: -f1) || true
    [ -n "$pkg" ] && [ -f "/usr/share/doc/$pkg/copyright" ] || continue
    mkdir -p "$STAGE/usr/share/doc/$pkg"
    cp "/usr/share/doc/$pkg/copyright" "$STAGE/usr/share/doc/$pkg/copyright"
done
mkdir -p "$STAGE/usr/share/doc/vfio-gpu-dra"
cp "$ROOT/LICENSE" "$STAGE/usr/share/doc/vfio-gpu-dra/LICENSE"

chown -R 0:0 "$STAGE"
find "$STAGE" -depth -exec touch -h -d "@$EPOCH" {} +

# The image: one layer with the whole staged root.
L=$OUT/oci
umoci init --layout "$L"
umoci new --image "$L:$VERSION"
umoci insert --image "$L:$VERSION" --history.created "$CREATED" \
    --history.created_by "deploy/image/build.sh" "$STAGE" /
umoci config --image "$L:$VERSION" --created "$CREATED" \
    --history.created "$CREATED" --history.created_by "deploy/image/build.sh (config)" \
    --os linux --architecture amd64 \
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
umoci gc --layout "$L"
# containerd names an imported image from this annotation (ref.name holds the tag
# only, and `ctr images import` would otherwise need --base-name).
python3 - "$L/index.json" "$NAME" <<'PY'
import json, sys
path, name = sys.argv[1], sys.argv[2]
with open(path) as f:
    index = json.load(f)
for m in index["manifests"]:
    m.setdefault("annotations", {})["io.containerd.image.name"] = name
with open(path, "w") as f:
    json.dump(index, f, separators=(",", ":"), sort_keys=True)
PY
find "$L" -depth -exec touch -h -d "@$EPOCH" {} +
ARCHIVE=$OUT/vfio-gpu-dra-$VERSION.oci.tar
tar --sort=name --mtime="@$EPOCH" --owner=0 --group=0 --numeric-owner \
    -C "$L" -cf "$ARCHIVE" .

# Sizes: compressed = the blobs (what a registry stores and a node pulls);
# uncompressed = the staged root filesystem.
read -r DIGEST COMPRESSED UNCOMPRESSED < <(python3 - "$L" "$STAGE" <<'PY'
import json, os, sys
layout, stage = sys.argv[1], sys.argv[2]
with open(os.path.join(layout, "index.json")) as f:
    desc = json.load(f)["manifests"][0]
def blob(d):
    return os.path.join(layout, "blobs", *d["digest"].split(":"))
with open(blob(desc)) as f:
    manifest = json.load(f)
compressed = desc["size"] + manifest["config"]["size"] + sum(l["size"] for l in manifest["layers"])
size = 0
for dirpath, dirs, files in os.walk(stage):
    for n in files:
        p = os.path.join(dirpath, n)
        if not os.path.islink(p):
            size += os.path.getsize(p)
print(desc["digest"], compressed, size)
PY
)
rm -rf "$STAGE"

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
cat > "$OUT/image.env" <<ENV
NAME=$NAME
TAG=$VERSION
DIGEST=$DIGEST
MANIFESTS=$MANIFESTS
COMPRESSED_BYTES=$COMPRESSED
UNCOMPRESSED_BYTES=$UNCOMPRESSED
LAYOUT=$L
ARCHIVE=$ARCHIVE
DEBUG=$DEBUG
ENV
log "$NAME $DIGEST: $COMPRESSED bytes compressed, $UNCOMPRESSED uncompressed"
echo "$NAME"
