# Helpers for the guest test scripts (busybox sh; sourced by /init).
#
# Output protocol on the serial console (parsed by tests/vm/check.py):
#   PASS <name>                 a check done in the guest passed
#   FAIL <name>: <detail>       ... failed
#   SKIP <name>: <reason>       not run (e.g. the CLI is not available)
#   === BEGIN <name> rc=<n> json=<0|1> === / === STDERR === / === END ===
#                               captured output of one command; the host checks
#                               the JSON in these blocks
#   METRIC <name> <value>       a measurement, reported by the host

PCI=/sys/bus/pci/devices
BIN=/bin/vfio-gpu-dra
OUT=/tmp/out
mkdir -p "$OUT"
DETAIL=
CLI_ENV=

# ---------------------------------------------------------------- modules
# kmod's option sources for module $1, in kmod's precedence order (later wins):
# /etc/modprobe.d/*.conf "options" lines, then "<mod>.<param>=<v>" words of the
# kernel command line. Module names compare with '-' == '_'. busybox insmod
# applies none of them on its own.
kmod_options() {
    _m=$(echo "$1" | tr - _)
    for _f in /etc/modprobe.d/*.conf; do
        [ -f "$_f" ] || continue
        awk -v m="$_m" '$1 == "options" { n = $2; gsub("-", "_", n); if (n == m) { for (i = 3; i <= NF; i++) printf "%s ", $i } }' "$_f"
    done
    for _t in $(cat /proc/cmdline); do
        case "$_t" in
        *.*=*)
            _n=$(echo "${_t%%.*}" | tr - _)
            [ "$_n" = "$_m" ] && printf '%s ' "${_t#*.}"
            ;;
        esac
    done
}

# $1: file of "<module> <path relative to /lib/modules/$(uname -r)>" lines in load order
load_modules() {
    _kdir=/lib/modules/$(uname -r)
    while read -r _mod _path; do
        [ -n "$_mod" ] || continue
        if [ -d "/sys/module/$(echo "$_mod" | tr - _)" ]; then
            echo "MODULE $_mod already-loaded"
            continue
        fi
        _opts=$(kmod_options "$_mod")
        # shellcheck disable=SC2086
        if insmod "$_kdir/$_path" $_opts; then
            echo "MODULE $_mod loaded ${_opts:+options: $_opts}"
        else
            echo "FAIL module.$_mod: insmod $_path $_opts failed"
        fi
    done < "$1"
}

# ---------------------------------------------------------------- checks
pass() { echo "PASS $1"; }
fail() { echo "FAIL $1: $2"; }
skip() { echo "SKIP $1: $2"; }

# check NAME CMD [ARGS...]: CMD sets $DETAIL when it fails
check() {
    _name=$1; shift
    DETAIL=
    if "$@"; then pass "$_name"; else fail "$_name" "${DETAIL:-$* returned false}"; fi
}

# ---------------------------------------------------------------- sysfs
drv() {   # driver name of device $1, or "none"
    if [ -e "$PCI/$1/driver" ]; then basename "$(readlink "$PCI/$1/driver")"; else echo none; fi
}
ovr() {   # driver_override of $1 ("(null)" when unset)
    cat "$PCI/$1/driver_override"
}
grp() {   # IOMMU group number of $1, or "none"
    if [ -e "$PCI/$1/iommu_group" ]; then basename "$(readlink "$PCI/$1/iommu_group")"; else echo none; fi
}
group_members() {  # sorted members of $1's IOMMU group
    ls "/sys/kernel/iommu_groups/$(grp "$1")/devices" | sort | tr '\n' ' ' | sed 's/ $//'
}

is_drv() {  # is_drv BDF WANT
    _got=$(drv "$1")
    [ "$_got" = "$2" ] || { DETAIL="$1 driver is $_got, want $2"; return 1; }
}
is_ovr() {  # is_ovr BDF WANT
    _got=$(ovr "$1")
    [ "$_got" = "$2" ] || { DETAIL="$1 driver_override is $_got, want $2"; return 1; }
}
has_vfio_node() {  # /dev/vfio/<group of $1> and vfio-dev/ exist
    _g=$(grp "$1")
    [ -c "/dev/vfio/$_g" ] || { DETAIL="/dev/vfio/$_g missing (group of $1)"; return 1; }
    [ -d "$PCI/$1/vfio-dev" ] || { DETAIL="$PCI/$1/vfio-dev missing"; return 1; }
}
no_vfio_node() {
    _g=$(grp "$1")
    [ ! -e "/dev/vfio/$_g" ] || { DETAIL="/dev/vfio/$_g still present"; return 1; }
}
members_are() {  # members_are BDF "sorted members"
    _got=$(group_members "$1")
    [ "$_got" = "$2" ] || { DETAIL="group of $1 has [$_got], want [$2]"; return 1; }
}
is_rc() {  # is_rc GOT WANT WHAT
    [ "$1" = "$2" ] || { DETAIL="$3: exit status $1, want $2 (see block $3)"; return 1; }
}
has_netdev() {  # a net interface hangs below device $1 (host driver really probed)
    for _n in "$PCI/$1"/net/* "$PCI/$1"/virtio*/net/*; do
        [ -e "$_n" ] && return 0
    done
    DETAIL="$1 has no net interface"
    return 1
}

# Raw moves (no CLI) used to set up / repair state between scenarios.
raw_to_vfio() {  # override, unbind, probe
    echo vfio-pci > "$PCI/$1/driver_override"
    [ -e "$PCI/$1/driver" ] && echo "$1" > "$PCI/$1/driver/unbind"
    echo "$1" > /sys/bus/pci/drivers_probe
}
raw_back() {     # clear override, unbind, probe (host driver or nothing)
    echo > "$PCI/$1/driver_override"
    [ -e "$PCI/$1/driver" ] && echo "$1" > "$PCI/$1/driver/unbind"
    echo "$1" > /sys/bus/pci/drivers_probe
}
# raw_restore BDF ORIG: put $1 back on ORIG (or unbound when ORIG=none), override cleared
raw_restore() {
    if [ "$(drv "$1")" != "$2" ] || [ "$(ovr "$1")" != "(null)" ]; then
        echo "NOTE restoring $1 to $2 (was $(drv "$1"), override $(ovr "$1"))"
        raw_back "$1"
        if [ "$2" = none ] && [ -e "$PCI/$1/driver" ]; then echo "$1" > "$PCI/$1/driver/unbind"; fi
    fi
}

lspci_lite() {
    for _d in /sys/bus/pci/devices/*; do
        _b=${_d##*/}
        echo "$_b $(cat "$_d/vendor"):$(cat "$_d/device") class=$(cat "$_d/class") driver=$(drv "$_b") override=$(ovr "$_b") group=$(grp "$_b")"
    done
}

now_ms() {  # monotonic milliseconds
    if [ -r /proc/timer_list ]; then
        awk '/^now at/ { printf "%d\n", $3 / 1000000; exit }' /proc/timer_list
    else
        awk '{ printf "%d\n", $1 * 1000 }' /proc/uptime
    fi
}

# ---------------------------------------------------------------- our CLI
cli_ready() { [ -x "$BIN" ] && [ ! -e /etc/vm/no-cli ]; }

# emit NAME CMD [ARGS...]: run, keep stdout/stderr, print them as a block; sets RC
emit() {
    _name=$1; shift
    "$@" > "$OUT/$_name.out" 2> "$OUT/$_name.err"
    RC=$?
    _j=0
    case " $* " in *" --output json "*) _j=1 ;; esac
    echo "=== BEGIN $_name rc=$RC json=$_j ==="
    awk 1 "$OUT/$_name.out"
    echo "=== STDERR ==="
    awk 1 "$OUT/$_name.err"
    echo "=== END ==="
    return 0
}
emit_file() { emit "$@"; }

# cli NAME SUBCOMMAND ARGS...: run our binary with the scenario's common flags
# ($STATE = state dir, $GPU_IDS = "--gpu-id x --gpu-id y"); sets RC
cli() {
    _name=$1; shift
    _sub=$1; shift
    # shellcheck disable=SC2086
    case "$_sub" in
    devices|explain) emit "$_name" env $CLI_ENV "$BIN" "$_sub" "$@" $GPU_IDS ;;
    *) emit "$_name" env $CLI_ENV "$BIN" "$_sub" "$@" --state-dir "$STATE" $GPU_IDS ;;
    esac
}

# cli_scenario NAME "GPU_IDS": start a CLI scenario on a fresh state dir with
# those --gpu-id flags; false (after a skip) when this guest has no CLI
cli_scenario() {
    if ! cli_ready; then skip "$1" "awaits the CLI"; return 1; fi
    new_state "$1"
    GPU_IDS=$2
}

# cli_ok NAME SUBCOMMAND ARGS...: cli, then check NAME-rc that it exited 0
cli_ok() {
    _ok_name=$1
    cli "$@"
    check "$_ok_name-rc" is_rc "$RC" 0 "$_ok_name"
}

# Fresh state dir for a scenario. Scenarios are independent installations, so
# the boot mirror of the ledger (/run/vfio-gpu-dra, which a fresh state dir
# would adopt records from) goes too.
new_state() {
    STATE=/var/lib/vfio-gpu-dra-$1
    rm -rf "$STATE" /run/vfio-gpu-dra
    mkdir -p "$STATE"
}

# ---------------------------------------------------------------- crash checks
# all_original "bdf:orig ...": all functions on their original driver, override cleared
all_original() {
    for _p in $1; do
        is_drv "${_p%:*}" "${_p##*:}" || return 1
        is_ovr "${_p%:*}" "(null)" || return 1
    done
}
all_vfio() {
    for _p in $1; do is_drv "${_p%:*}" vfio-pci || return 1; done
}
consistent() { all_original "$1" || all_vfio "$1" || { DETAIL="mixed state: $(for _p in $1; do printf '%s=%s/%s ' "${_p%:*}" "$(drv "${_p%:*}")" "$(ovr "${_p%:*}")"; done)"; return 1; }; }
restore_all() { for _p in $1; do raw_restore "${_p%:*}" "${_p##*:}"; done; }
crashed() { [ "$1" -ge 128 ] 2>/dev/null; }
