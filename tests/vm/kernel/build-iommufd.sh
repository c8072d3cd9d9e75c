#!/usr/bin/env bash
# Build the IOMMUFD test kernel for tests/vm from Debian's linux-source-6.12
# package: `make x86_64_defconfig` + iommufd.config, then `bzImage modules`,
# installed like an extracted kernel .deb (boot/vmlinuz-<kver>, lib/modules/<kver>)
# plus the uAPI headers (usr/include, for the guest's iommufd test program).
#
# Usage: tests/vm/kernel/build-iommufd.sh     prints the result directory
# The result is cached outside the clone, keyed on the source package version and
# the sha256 of iommufd.config (and BUILD_REV below), so a warm machine does not
# rebuild:  ${VM_KERNEL_CACHE:-/var/cache/vfio-gpu-dra-vm}/iommufd-<version>-<sha12>/
# Environment: VM_KERNEL_CACHE (cache root), VM_KERNEL_JOBS (make -j, default nproc),
# VM_KERNEL_SRC_VERSION (a linux-source-6.12 version; default: apt's candidate).
# Needs root (apt-get for the build dependencies). Progress goes to stderr, the
# build log to <result>.log.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
FRAG=$HERE/iommufd.config
SRCPKG=linux-source-6.12
# Bump when the build steps below change in a way that changes the result.
BUILD_REV=1
CACHE=${VM_KERNEL_CACHE:-/var/cache/vfio-gpu-dra-vm}
export DEBIAN_FRONTEND=noninteractive
log() { echo "build-iommufd: $*" >&2; }

need=()
# rsync: headers_install copies the uAPI headers with it
for p in build-essential flex bison bc libelf-dev libssl-dev xz-utils kmod rsync; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" > /dev/null
fi

candidate() { apt-cache policy "$SRCPKG" 2>/dev/null | awk '/Candidate:/ { print $2 }'; }
VER=${VM_KERNEL_SRC_VERSION:-$(candidate)}
if [ -z "$VER" ] || [ "$VER" = "(none)" ]; then apt-get update -qq; VER=$(candidate); fi
[ -n "$VER" ] && [ "$VER" != "(none)" ] || { echo "build-iommufd: no $SRCPKG in apt's lists" >&2; exit 1; }
KEY=$( { cat "$FRAG"; echo "BUILD_REV=$BUILD_REV"; } | sha256sum | cut -c1-12)
OUT=$CACHE/iommufd-${VER//[^A-Za-z0-9.+-]/_}-$KEY
if [ -e "$OUT/.ready" ]; then
    log "cached: $OUT"
    echo "$OUT"
    exit 0
fi

t0=$(date +%s)
mkdir -p "$CACHE"
B=$OUT.build
LOG=$OUT.log
rm -rf "$OUT"
mkdir -p "$OUT"
if [ -e "$B/.extracted" ]; then
    # an interrupted build of the same version and fragment: make resumes it
    log "resuming the build in $B (log: $LOG)"
else
    rm -rf "$B"
    mkdir -p "$B/deb"
    : > "$LOG"
    log "fetching $SRCPKG=$VER (log: $LOG)"
    # apt-get download writes to the cwd; as root it warns that _apt cannot: harmless.
    (cd "$B/deb" && apt-get download -q "$SRCPKG=$VER" >> "$LOG" 2>&1)
    dpkg-deb -x "$B/deb/"*.deb "$B/deb/x"
    tarball=$(ls "$B"/deb/x/usr/src/linux-source-*.tar.*)
    tar -C "$B" -xaf "$tarball"
    rm -rf "$B/deb"
    touch "$B/.extracted"
fi
SRC=$(ls -d "$B"/linux-source-*/)
cd "$SRC"
log "configuring (x86_64_defconfig + $(basename "$FRAG"))"
make -s x86_64_defconfig >> "$LOG" 2>&1
scripts/kconfig/merge_config.sh -m .config "$FRAG" >> "$LOG" 2>&1
make -s olddefconfig >> "$LOG" 2>&1
# merge_config warns about overridden values; a value the tests need that did not
# survive olddefconfig (unmet dependency) is an error here; a trim ("is not set")
# that another option selects back is only noted.
bad=0
while IFS= read -r line; do
    case "$line" in
    CONFIG_*=*) grep -qxF "$line" .config || { log "fragment line not in .config: $line"; bad=1; } ;;
    "# CONFIG_"*" is not set")
        sym=${line#\# }; sym=${sym%% *}
        ! grep -q "^$sym=" .config || log "note: $sym selected back on (trim only)" ;;
    esac
done < "$FRAG"
[ $bad = 0 ] || exit 1
KVER=$(make -s kernelrelease)
log "building $KVER: bzImage modules (make -j${VM_KERNEL_JOBS:-$(nproc)})"
make -j"${VM_KERNEL_JOBS:-$(nproc)}" bzImage modules >> "$LOG" 2>&1 || { tail -40 "$LOG" >&2; exit 1; }
mkdir -p "$OUT/boot"
cp arch/x86/boot/bzImage "$OUT/boot/vmlinuz-$KVER"
cp .config "$OUT/boot/config-$KVER"
make -s INSTALL_MOD_PATH="$OUT" modules_install >> "$LOG" 2>&1
# modules_install may place them under usr/lib/modules (merged-usr); run.sh wants lib/modules
if [ ! -d "$OUT/lib/modules" ] && [ -d "$OUT/usr/lib/modules" ]; then
    mkdir -p "$OUT/lib" && mv "$OUT/usr/lib/modules" "$OUT/lib/modules"
fi
rm -f "$OUT/lib/modules/$KVER/build" "$OUT/lib/modules/$KVER/source"
make -s INSTALL_HDR_PATH="$OUT/usr" headers_install >> "$LOG" 2>&1
echo "$VER" > "$OUT/source-version"
cd /
rm -rf "$B"
t1=$(date +%s)
echo "$((t1 - t0))" > "$OUT/build-seconds"
log "built $KVER in $((t1 - t0)) s: $OUT"
touch "$OUT/.ready"
echo "$OUT"
