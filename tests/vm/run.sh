#!/usr/bin/env bash
# Real-kernel tests for vfio-gpu-dra: boot real kernels under qemu (TCG, no KVM)
# with emulated PCI devices, an emulated Intel IOMMU and the vfio modules, and run
# our CLI against the guest's real sysfs. See tests/vm/README.md.
#
# Usage: tests/vm/run.sh [--no-cli] [--kernel K]... [GROUP...]
#   GROUP      boots to run on each kernel that has them (default: all):
#              cmdline modprobe crash live builtin
#   --kernel K kernels to boot (repeatable; default: all, or $VM_KERNELS):
#              deb6.1    Debian's current 6.1 (linux-image-amd64)
#              deb6.12   Debian's current 6.12 (linux-image-6.12-amd64): virtio_pci
#                        built in (boot "builtin")
#              iommufd   6.12 built from Debian's linux-source-6.12 with
#                        tests/vm/kernel/iommufd.config (/dev/iommu, vfio cdevs);
#                        cached in $VM_KERNEL_CACHE (default /var/cache/vfio-gpu-dra-vm)
#   --no-cli   run only the raw-kernel parts (boot, modules, sysfs); the CLI
#              scenarios print SKIP. Without it a binary lacking the CLI fails.
# Environment:
#   VM_KERNELS="deb6.1 ..."  default kernel list (--kernel wins)
#   VM_KERNEL_CACHE=dir      where build-iommufd.sh keeps its kernel builds
#   VM_BIN=path     use this vfio-gpu-dra binary (static or dynamic) instead of
#                   building one
#   VM_STATIC=1     build a static binary (crt-static, target dir target/vm)
#                   instead of `cargo build --release -p vfio-gpu-dra`
#   VM_PROFILE=debug  build with `cargo build -p vfio-gpu-dra` (reuses the
#                   debug deps of `cargo test`; the CLI runs slower under TCG)
#   VM_TIMEOUT=s    per-boot timeout (default 600)
#   VM_JOBS=n       boots run in parallel (default 2)
#   VM_VERBOSE=1    drop "quiet" from the guest kernel command line
# Needs root (apt-get, mknod). Works with CI=true and no stdin.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
WORK=$HERE/work
LOGS=$WORK/logs
HOSTLOG=$LOGS/host.log
ALL_GROUPS=(cmdline modprobe crash live builtin)
ALL_KERNELS=(deb6.1 deb6.12 iommufd)
# The boots of each kernel; builtin needs a built-in virtio_pci (6.12 kernels).
kernel_groups() {
    case "$1" in
    deb6.1) echo cmdline modprobe crash live ;;
    deb6.12|iommufd) echo cmdline modprobe crash live builtin ;;
    esac
}
NO_CLI=0
GROUPS_SEL=()
KERNELS_SEL=()
while [ $# -gt 0 ]; do
    case "$1" in
    --no-cli) NO_CLI=1 ;;
    --kernel) [ $# -ge 2 ] || { echo "run.sh: --kernel needs a value" >&2; exit 2; }; KERNELS_SEL+=("$2"); shift ;;
    --kernel=*) KERNELS_SEL+=("${1#--kernel=}") ;;
    -h|--help) sed -n '2,37p' "$0"; exit 0 ;;
    -*) echo "run.sh: unknown option $1" >&2; exit 2 ;;
    *) GROUPS_SEL+=("$1") ;;
    esac
    shift
done
[ ${#GROUPS_SEL[@]} -gt 0 ] || GROUPS_SEL=("${ALL_GROUPS[@]}")
if [ ${#KERNELS_SEL[@]} = 0 ]; then
    # shellcheck disable=SC2206
    if [ -n "${VM_KERNELS:-}" ]; then KERNELS_SEL=($VM_KERNELS); else KERNELS_SEL=("${ALL_KERNELS[@]}"); fi
fi
for k in "${KERNELS_SEL[@]}"; do
    [ -n "$(kernel_groups "$k")" ] || { echo "run.sh: unknown kernel $k (known: ${ALL_KERNELS[*]})" >&2; exit 2; }
done
for g in "${GROUPS_SEL[@]}"; do
    case " ${ALL_GROUPS[*]} " in *" $g "*) ;; *) echo "run.sh: unknown group $g (known: ${ALL_GROUPS[*]})" >&2; exit 2 ;; esac
done
# BOOTS: "<kernel>-<group>" for each selected group the kernel runs
BOOTS=()
for k in "${KERNELS_SEL[@]}"; do
    for g in $(kernel_groups "$k"); do
        for s in "${GROUPS_SEL[@]}"; do [ "$s" = "$g" ] && BOOTS+=("$k-$g"); done
    done
done
[ ${#BOOTS[@]} -gt 0 ] || { echo "run.sh: no boot selected (kernels ${KERNELS_SEL[*]}, groups ${GROUPS_SEL[*]})" >&2; exit 2; }
export DEBIAN_FRONTEND=noninteractive

T_START=$(date +%s.%N)
mkdir -p "$WORK" "$LOGS"
: > "$HOSTLOG"
log() { echo "vm: $*" >&2; }
hostline() { echo "$*" >> "$HOSTLOG"; }
since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
timing() { hostline "TIME $1 ${2}s"; log "$1: ${2}s"; }

# ------------------------------------------------------------------ packages
t=$(date +%s.%N)
APT_UPDATED=0
apt_update() { [ $APT_UPDATED = 1 ] || { apt-get update -qq; APT_UPDATED=1; }; }
need=()
for p in qemu-system-x86 busybox-static cpio kmod; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    apt_update
    apt-get install -y -qq --no-install-recommends "${need[@]}" > "$LOGS/apt.log" 2>&1 || { cat "$LOGS/apt.log" >&2; exit 1; }
fi
command -v python3 > /dev/null || { apt_update; apt-get install -y -qq --no-install-recommends python3 > /dev/null; }
timing packages "$(since "$t")"

# ------------------------------------------------------------------ kernels
# Each kernel ends up as an extracted-package tree: boot/vmlinuz-<kver>,
# lib/modules/<kver> (depmod'ed). KVERS/VMLINUZ/MDIRS/KTREE by kernel name.
declare -A KVERS VMLINUZ MDIRS KTREE
# deb_kernel NAME META: Debian's current kernel behind the meta package META,
# downloaded and extracted (never installed) under work/kernel/
deb_kernel() {
    local name=$1 meta=$2 pkg dir deb
    kpkg() { apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }'; }
    pkg=$(kpkg || true)
    if [ -z "$pkg" ]; then apt_update; pkg=$(kpkg); fi
    [ -n "$pkg" ] || { echo "run.sh: cannot resolve $meta's kernel package" >&2; exit 1; }
    dir=$WORK/kernel/$pkg
    if [ ! -e "$dir/.ready" ]; then
        log "fetching $pkg"
        rm -rf "$dir" "$WORK/debs"
        mkdir -p "$dir" "$WORK/debs"
        # apt-get download writes to the cwd; _apt cannot write there, so apt warns
        # and downloads as root: harmless.
        (cd "$WORK/debs" && { apt-get download -q "$pkg" 2>&1 || { apt_update && apt-get download -q "$pkg"; }; } | grep -v '^W: Download is performed unsandboxed' || true)
        deb=$(ls "$WORK/debs/${pkg}_"*.deb)
        dpkg-deb -x "$deb" "$dir"
        rm -f "$deb"
        depmod -b "$dir" "$(ls "$dir/lib/modules")"
        touch "$dir/.ready"
    fi
    KTREE[$name]=$dir
    KPKGNAME[$name]=$pkg
}
declare -A KPKGNAME
for k in "${KERNELS_SEL[@]}"; do
    t=$(date +%s.%N)
    case "$k" in
    deb6.1) deb_kernel "$k" linux-image-amd64 ;;
    deb6.12) deb_kernel "$k" linux-image-6.12-amd64 ;;
    iommufd)
        # built once per (source version, config fragment), cached outside the clone
        KTREE[$k]=$("$HERE/kernel/build-iommufd.sh" | tail -1)
        KPKGNAME[$k]="linux-source-6.12 $(cat "${KTREE[$k]}/source-version") + kernel/iommufd.config" ;;
    esac
    KVERS[$k]=$(ls "${KTREE[$k]}/lib/modules")
    VMLINUZ[$k]=${KTREE[$k]}/boot/vmlinuz-${KVERS[$k]}
    MDIRS[$k]=${KTREE[$k]}/lib/modules/${KVERS[$k]}
    [ -r "${VMLINUZ[$k]}" ] || { echo "run.sh: no ${VMLINUZ[$k]}" >&2; exit 1; }
    log "kernel $k: ${KVERS[$k]} (${KPKGNAME[$k]})"
    hostline "KERNEL $k ${KVERS[$k]} (${KPKGNAME[$k]})"
    timing "kernel-$k" "$(since "$t")"
done
# Guest test programs per kernel. iommufd-bind (guest/iommufd-bind.c) opens a vfio
# cdev and binds it to an iommufd like QEMU does; static, built against the uAPI
# headers of the kernel it runs on (bookworm's linux-libc-dev 6.1 has no iommufd).
declare -A GUEST_TOOLS
if [ -n "${KTREE[iommufd]:-}" ]; then
    gcc -static -O2 -Wall -Werror -I "${KTREE[iommufd]}/usr/include" \
        -o "$WORK/iommufd-bind" "$HERE/guest/iommufd-bind.c"
    GUEST_TOOLS[iommufd]=$WORK/iommufd-bind
fi

# ------------------------------------------------------------------ binary
t=$(date +%s.%N)
BIN=
BUILD_FAILED=0
if [ -n "${VM_BIN:-}" ]; then
    BIN=$VM_BIN
elif [ "${VM_STATIC:-0}" = 1 ]; then
    log "building static vfio-gpu-dra (target/vm)"
    (cd "$ROOT" && RUSTFLAGS="-C target-feature=+crt-static" cargo build -q --release \
        --target x86_64-unknown-linux-gnu --target-dir target/vm -p vfio-gpu-dra) || BUILD_FAILED=1
    BIN=$ROOT/target/vm/x86_64-unknown-linux-gnu/release/vfio-gpu-dra
elif [ "${VM_PROFILE:-release}" = debug ]; then
    log "building vfio-gpu-dra (cargo build -p vfio-gpu-dra)"
    (cd "$ROOT" && cargo build -q -p vfio-gpu-dra) || BUILD_FAILED=1
    BIN=$ROOT/target/debug/vfio-gpu-dra
else
    log "building vfio-gpu-dra (cargo build --release -p vfio-gpu-dra)"
    (cd "$ROOT" && cargo build -q --release -p vfio-gpu-dra) || BUILD_FAILED=1
    BIN=$ROOT/target/release/vfio-gpu-dra
fi
if [ $BUILD_FAILED = 1 ] || [ ! -x "$BIN" ]; then
    # still boot: the raw-kernel checks run, the CLI scenarios SKIP, the run fails
    hostline "FAIL host.build: no usable vfio-gpu-dra binary (build failed or $BIN missing)"
    BIN=/bin/true
fi
timing build "$(since "$t")"
CLI_OK=1
help=$("$BIN" --help 2>&1 || true)
for sub in devices explain bind release reconcile ledger; do
    grep -qw "$sub" <<< "$help" || CLI_OK=0
done
if [ $CLI_OK = 1 ]; then
    hostline "PASS host.cli-has-subcommands"
elif [ $NO_CLI = 1 ]; then
    hostline "SKIP host.cli-has-subcommands: --no-cli"
else
    hostline "FAIL host.cli-has-subcommands: $BIN --help does not list devices/explain/bind/release/reconcile/ledger (use --no-cli to run only the raw-kernel parts)"
fi
[ $CLI_OK = 1 ] && [ $NO_CLI = 0 ] && USE_CLI=1 || USE_CLI=0

# ------------------------------------------------------------------ initramfs
# copy_with_libs FILE DEST_ROOT: copy a binary to the same path plus what ldd lists
copy_with_libs() {
    local f=$1 root=$2 lib
    if ldd "$f" > /dev/null 2>&1; then
        for lib in $(ldd "$f" | grep -o '/[^ ]*'); do
            mkdir -p "$root$(dirname "$lib")"
            cp -L "$lib" "$root$lib"
        done
    fi
}

# build_initramfs BOOT SCENARIOS ENVLINES [MODPROBE_CONF]
# (BOOT = <kernel>-<group>; the modules are those of kernel $K)
build_initramfs() {
    local g=$1 scenarios=$2 envlines=$3 modconf=${4:-} d=$WORK/initramfs/$1
    local MDIR=${MDIRS[$K]} KVER=${KVERS[$K]}
    rm -rf "$d"
    mkdir -p "$d"/{bin,sbin,etc/vm,etc/modprobe.d,lib/vm/scenarios,proc,sys,dev,tmp,run,var/lib,usr/bin,usr/sbin,root}
    cp /bin/busybox "$d/bin/busybox"
    for a in $(/bin/busybox --list); do
        [ -e "$d/bin/$a" ] || ln -s busybox "$d/bin/$a"
    done
    mknod -m 600 "$d/dev/console" c 5 1
    mknod -m 666 "$d/dev/null" c 1 3
    # kernel modules at their real paths, plus the index files (the tool reads
    # modules.builtin to decide module vs built-in)
    python3 "$HERE/modorder.py" "$MDIR" vfio vfio_iommu_type1 vfio-pci e1000e e1000 virtio_pci virtio_net > "$d/etc/vm/modules.order"
    local km=$d/lib/modules/$KVER m p
    mkdir -p "$km"
    while read -r m p; do
        mkdir -p "$km/$(dirname "$p")"
        case "$p" in
        *.ko.xz) xz -dc "$MDIR/$p" > "$km/${p%.xz}" ;;
        *.ko.zst) zstd -qdc "$MDIR/$p" > "$km/${p%.zst}" ;;
        *.ko.gz) gzip -dc "$MDIR/$p" > "$km/${p%.gz}" ;;
        *) cp "$MDIR/$p" "$km/$p" ;;
        esac
    done < "$d/etc/vm/modules.order"
    sed -i -E 's/\.ko\.(xz|zst|gz)$/.ko/' "$d/etc/vm/modules.order"
    for f in modules.builtin modules.builtin.modinfo modules.order modules.dep modules.alias modules.softdep; do
        [ -e "$MDIR/$f" ] && cp "$MDIR/$f" "$km/$f"
    done
    # our binary (debug info stripped to keep the initramfs small) + its libraries
    if command -v objcopy > /dev/null && [ "$(head -c4 "$BIN" | tail -c3)" = ELF ]; then
        objcopy --strip-debug "$BIN" "$d/bin/vfio-gpu-dra"
    else
        cp "$BIN" "$d/bin/vfio-gpu-dra"
    fi
    copy_with_libs "$BIN" "$d"
    [ $USE_CLI = 1 ] || touch "$d/etc/vm/no-cli"
    cp "$HERE/guest/init" "$d/init"
    cp "$HERE/guest/lib.sh" "$HERE/guest/topology.sh" "$d/lib/vm/"
    cp "$HERE"/guest/scenarios/*.sh "$d/lib/vm/scenarios/"
    [ -z "${GUEST_TOOLS[$K]:-}" ] || cp ${GUEST_TOOLS[$K]} "$d/bin/"
    # util-linux setpriv (busybox's cannot set the bounding set): plugin-caps runs
    # the plugin with only the DaemonSet's capabilities.
    if command -v setpriv > /dev/null; then
        cp -L "$(command -v setpriv)" "$d/usr/bin/ul-setpriv"
        copy_with_libs "$(command -v setpriv)" "$d"
    fi
    echo "$scenarios" > "$d/etc/vm/scenarios"
    printf '%s\n' "$envlines" > "$d/etc/vm/env"
    [ -z "$modconf" ] || printf '%s\n' "$modconf" > "$d/etc/modprobe.d/vfio.conf"
    chmod +x "$d/init"
    (cd "$d" && find . -print0 | cpio --null -o -H newc --quiet) > "$WORK/initramfs-$g.cpio"
}

# ------------------------------------------------------------------ boot
QEMU_DEVICES=(
    -device intel-iommu,intremap=on
    -device pcie-root-port,id=rp1,chassis=1,slot=1,bus=pcie.0,addr=0x2
    -netdev user,id=n1,restrict=on -device e1000e,netdev=n1,bus=rp1
    -device pcie-root-port,id=rp2,chassis=2,slot=2,bus=pcie.0,addr=0x3
    -netdev user,id=n2,restrict=on -device virtio-net-pci,netdev=n2,disable-legacy=on,bus=rp2
    -netdev user,id=n3,restrict=on -device e1000,netdev=n3,bus=pcie.0,addr=0x4.0,multifunction=on
    -device pci-testdev,bus=pcie.0,addr=0x4.1
    -device edu,bus=pcie.0,addr=0x5
)

# boot BOOT EXTRA_CMDLINE  (BOOT = <kernel>-<group>)
boot() {
    local g=$1 extra=$2 log=$LOGS/$1.log quiet=quiet rc=0 t k=${1%%-*}
    [ "${VM_VERBOSE:-0}" = 1 ] && quiet=
    t=$(date +%s.%N)
    rm -f "$log"
    # no_timer_check: on a loaded host TCG can fail the kernel's early IO-APIC timer
    # test, which with interrupt remapping on is a panic ("timer doesn't work
    # through Interrupt-remapped IO-APIC"); the check proves nothing we test.
    timeout "${VM_TIMEOUT:-600}" qemu-system-x86_64 -machine q35 -accel tcg -m 1024 -smp 1 \
        -nodefaults -no-user-config -display none -monitor none -no-reboot \
        -serial "file:$log" \
        -kernel "${VMLINUZ[$k]}" -initrd "$WORK/initramfs-$g.cpio" \
        -append "console=ttyS0 intel_iommu=on iommu=pt no_timer_check panic=-1 rdinit=/init $quiet $extra" \
        "${QEMU_DEVICES[@]}" < /dev/null > "$LOGS/$g.qemu.log" 2>&1 || rc=$?
    local wall
    wall=$(since "$t")
    local init_up
    init_up=$(sed -n 's/^VM-INIT uptime=\([0-9.]*\).*/\1/p' "$log" 2>/dev/null | tr -d '\r' | head -1)
    hostline "BOOT $g kernel=${KVERS[$k]} kernel_to_init=${init_up:-?}s vm_wall=${wall}s qemu_rc=$rc"
    log "boot $g (${KVERS[$k]}): kernel->init ${init_up:-?}s, whole VM run ${wall}s (qemu exit $rc)"
    if [ $rc = 124 ]; then hostline "FAIL host.$g-timeout: qemu killed after ${VM_TIMEOUT:-600}s"; fi
}

CMDLINE_IDS="vfio-pci.ids=8086:10d3"
declare -A EXTRA
for b in "${BOOTS[@]}"; do
    t=$(date +%s.%N)
    K=${b%%-*}
    case "${b#*-}" in
    cmdline)
        build_initramfs "$b" "baseline prebound doctor runtime-move state-lost two-function no-host-driver foreign-override reset measure" \
            "PREBOUND=yes
PREBOUND_SOURCE=kernel-cmdline"
        EXTRA[$b]=$CMDLINE_IDS ;;
    modprobe)
        build_initramfs "$b" "baseline prebound doctor plugin plugin-caps iommufd" \
            "PREBOUND=yes
PREBOUND_SOURCE=modprobe" \
            "# written by tests/vm/run.sh: vfio-pci is a module here, so kmod applies this
options vfio-pci ids=8086:10d3"
        EXTRA[$b]= ;;
    crash)
        build_initramfs "$b" "baseline crash" "PREBOUND=yes
PREBOUND_SOURCE=kernel-cmdline"
        EXTRA[$b]=$CMDLINE_IDS ;;
    live)
        build_initramfs "$b" "baseline plugin-intent plugin-deleted-claim plugin-crash" "PREBOUND=yes
PREBOUND_SOURCE=kernel-cmdline"
        EXTRA[$b]=$CMDLINE_IDS ;;
    builtin)
        # virtio-net's id is named too, but the built-in virtio_pci binds it at
        # PCI enumeration, long before the vfio-pci module loads
        build_initramfs "$b" "baseline builtin-race" "PREBOUND=yes
PREBOUND_SOURCE=kernel-cmdline"
        EXTRA[$b]="$CMDLINE_IDS,1af4:1041" ;;
    esac
    timing "initramfs-$b" "$(since "$t")"
done

# Boots run VM_JOBS at a time (default 2: one TCG vCPU each); the longest first.
t=$(date +%s.%N)
JOBS=${VM_JOBS:-2}
order=()
for g in crash live cmdline modprobe builtin; do
    for b in "${BOOTS[@]}"; do [ "${b#*-}" = "$g" ] && order+=("$b"); done
done
running=0
for b in "${order[@]}"; do
    if [ "$running" -ge "$JOBS" ]; then wait -n || true; running=$((running - 1)); fi
    boot "$b" "${EXTRA[$b]}" &
    running=$((running + 1))
done
wait || true
timing boots "$(since "$t")"

# ------------------------------------------------------------------ results
timing total "$(since "$T_START")"
logs=()
for b in "${BOOTS[@]}"; do logs+=("$LOGS/$b.log"); done
rc=0
python3 "$HERE/check.py" "$HOSTLOG" "${logs[@]}" | tee "$LOGS/summary.txt" || rc=$?
if [ $rc != 0 ]; then
    stamp=$(date +%Y%m%d-%H%M%S)
    mkdir -p "$LOGS/failed-$stamp"
    cp "$LOGS"/*.log "$LOGS/summary.txt" "$LOGS/failed-$stamp/" 2>/dev/null || true
    log "FAILED: guest logs kept in $LOGS/failed-$stamp/"
fi
exit $rc
