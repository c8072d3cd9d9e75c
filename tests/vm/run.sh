#!/usr/bin/env bash
# Real-kernel tests for vfio-gpu-dra: boot Debian's stock kernel under qemu (TCG,
# no KVM) with emulated PCI devices, an emulated Intel IOMMU and the vfio modules,
# and run our CLI against the guest's real sysfs. See tests/vm/README.md.
#
# Usage: tests/vm/run.sh [--no-cli] [GROUP...]
#   GROUP      boots to run (default: all): cmdline modprobe crash live
#   --no-cli   run only the raw-kernel parts (boot, modules, sysfs); the CLI
#              scenarios print SKIP. Without it a binary lacking the CLI fails.
# Environment:
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
ALL_GROUPS=(cmdline modprobe crash live)
NO_CLI=0
GROUPS_SEL=()
for a in "$@"; do
    case "$a" in
    --no-cli) NO_CLI=1 ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    -*) echo "run.sh: unknown option $a" >&2; exit 2 ;;
    *) GROUPS_SEL+=("$a") ;;
    esac
done
[ ${#GROUPS_SEL[@]} -gt 0 ] || GROUPS_SEL=("${ALL_GROUPS[@]}")
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

# ------------------------------------------------------------------ kernel
t=$(date +%s.%N)
kpkg() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }'; }
KPKG=$(kpkg || true)
if [ -z "$KPKG" ]; then apt_update; KPKG=$(kpkg); fi
[ -n "$KPKG" ] || { echo "run.sh: cannot resolve linux-image-amd64's kernel package" >&2; exit 1; }
KDIR=$WORK/kernel/$KPKG
if [ ! -e "$KDIR/.ready" ]; then
    log "fetching $KPKG"
    rm -rf "$KDIR" "$WORK/debs"
    mkdir -p "$KDIR" "$WORK/debs"
    # apt-get download writes to the cwd; _apt cannot write there, so apt warns
    # and downloads as root: harmless.
    (cd "$WORK/debs" && { apt-get download -q "$KPKG" 2>&1 || { apt_update && apt-get download -q "$KPKG"; }; } | grep -v '^W: Download is performed unsandboxed' || true)
    deb=$(ls "$WORK/debs/${KPKG}_"*.deb)
    dpkg-deb -x "$deb" "$KDIR"
    rm -f "$deb"
    depmod -b "$KDIR" "$(ls "$KDIR/lib/modules")"
    touch "$KDIR/.ready"
fi
KVER=$(ls "$KDIR/lib/modules")
VMLINUZ=$KDIR/boot/vmlinuz-$KVER
MDIR=$KDIR/lib/modules/$KVER
[ -r "$VMLINUZ" ] || { echo "run.sh: no $VMLINUZ" >&2; exit 1; }
log "kernel $KVER ($KPKG)"
timing kernel "$(since "$t")"

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

# build_initramfs GROUP SCENARIOS ENVLINES [MODPROBE_CONF]
build_initramfs() {
    local g=$1 scenarios=$2 envlines=$3 modconf=${4:-} d=$WORK/initramfs/$g
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

# boot GROUP EXTRA_CMDLINE
boot() {
    local g=$1 extra=$2 log=$LOGS/$g.log quiet=quiet rc=0 t
    [ "${VM_VERBOSE:-0}" = 1 ] && quiet=
    t=$(date +%s.%N)
    rm -f "$log"
    # no_timer_check: on a loaded host TCG can fail the kernel's early IO-APIC timer
    # test, which with interrupt remapping on is a panic ("timer doesn't work
    # through Interrupt-remapped IO-APIC"); the check proves nothing we test.
    timeout "${VM_TIMEOUT:-600}" qemu-system-x86_64 -machine q35 -accel tcg -m 1024 -smp 1 \
        -nodefaults -no-user-config -display none -monitor none -no-reboot \
        -serial "file:$log" \
        -kernel "$VMLINUZ" -initrd "$WORK/initramfs-$g.cpio" \
        -append "console=ttyS0 intel_iommu=on iommu=pt no_timer_check panic=-1 rdinit=/init $quiet $extra" \
        "${QEMU_DEVICES[@]}" < /dev/null > "$LOGS/$g.qemu.log" 2>&1 || rc=$?
    local wall
    wall=$(since "$t")
    local init_up
    init_up=$(sed -n 's/^VM-INIT uptime=\([0-9.]*\).*/\1/p' "$log" 2>/dev/null | tr -d '\r' | head -1)
    hostline "BOOT $g kernel_to_init=${init_up:-?}s vm_wall=${wall}s qemu_rc=$rc"
    log "boot $g: kernel->init ${init_up:-?}s, whole VM run ${wall}s (qemu exit $rc)"
    if [ $rc = 124 ]; then hostline "FAIL host.$g-timeout: qemu killed after ${VM_TIMEOUT:-600}s"; fi
}

CMDLINE_IDS="vfio-pci.ids=8086:10d3"
declare -A EXTRA
for g in "${GROUPS_SEL[@]}"; do
    t=$(date +%s.%N)
    case "$g" in
    cmdline)
        build_initramfs cmdline "baseline prebound doctor runtime-move two-function no-host-driver foreign-override measure" \
            "PREBOUND=yes
PREBOUND_SOURCE=kernel-cmdline"
        EXTRA[$g]=$CMDLINE_IDS ;;
    modprobe)
        build_initramfs modprobe "baseline prebound doctor plugin" \
            "PREBOUND=yes
PREBOUND_SOURCE=modprobe" \
            "# written by tests/vm/run.sh: vfio-pci is a module here, so kmod applies this
options vfio-pci ids=8086:10d3"
        EXTRA[$g]= ;;
    crash)
        build_initramfs crash "baseline crash" "PREBOUND=yes
PREBOUND_SOURCE=kernel-cmdline"
        EXTRA[$g]=$CMDLINE_IDS ;;
    live)
        build_initramfs live "baseline plugin-intent plugin-deleted-claim plugin-crash" "PREBOUND=yes
PREBOUND_SOURCE=kernel-cmdline"
        EXTRA[$g]=$CMDLINE_IDS ;;
    *) echo "run.sh: unknown group $g (known: ${ALL_GROUPS[*]})" >&2; exit 2 ;;
    esac
    timing "initramfs-$g" "$(since "$t")"
done

# Boots run VM_JOBS at a time (default 2: one TCG vCPU each); the longest first.
t=$(date +%s.%N)
JOBS=${VM_JOBS:-2}
order=()
for g in crash live cmdline modprobe; do
    for s in "${GROUPS_SEL[@]}"; do [ "$s" = "$g" ] && order+=("$g"); done
done
running=0
for g in "${order[@]}"; do
    if [ "$running" -ge "$JOBS" ]; then wait -n || true; running=$((running - 1)); fi
    boot "$g" "${EXTRA[$g]}" &
    running=$((running + 1))
done
wait || true
timing boots "$(since "$t")"

# ------------------------------------------------------------------ results
timing total "$(since "$T_START")"
logs=()
for g in "${GROUPS_SEL[@]}"; do logs+=("$LOGS/$g.log"); done
rc=0
python3 "$HERE/check.py" "$HOSTLOG" "${logs[@]}" | tee "$LOGS/summary.txt" || rc=$?
if [ $rc != 0 ]; then
    stamp=$(date +%Y%m%d-%H%M%S)
    mkdir -p "$LOGS/failed-$stamp"
    cp "$LOGS"/*.log "$LOGS/summary.txt" "$LOGS/failed-$stamp/" 2>/dev/null || true
    log "FAILED: guest logs kept in $LOGS/failed-$stamp/"
fi
exit $rc
