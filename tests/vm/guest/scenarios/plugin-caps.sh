# M4 (security review): the plugin as the DaemonSet runs it, not privileged and
# without hostPID. `demo` (the real serve) runs as root with only the
# capabilities deploy/daemonset.yaml adds (bounding set, no_new_privs), in its own
# PID and mount namespace with its own /proc, reading the host through a
# host-root mount (an rbind of /, as the pod's /host-root):
# - with those capabilities it prepares and unprepares (virtio-net moved and
#   returned; the pre-bound e1000e checked for holders while a process of another
#   uid runs, so the holder scan reads /proc/<pid>/fd of every uid);
# - without hostPID the scan still sees a host process (outside the plugin's PID
#   namespace) holding the e1000e's group, by its host pid, and refuses the claim;
# - without CAP_SYS_PTRACE, or without CAP_DAC_READ_SEARCH, the scan cannot read
#   the descriptors of root's / another uid's processes: the prepare fails closed,
#   naming the path and "Permission denied", and nothing moves.
S=caps
D=/tmp/caps-demo
SETPRIV=/usr/bin/ul-setpriv
HR=/mnt/host
# The DaemonSet's capabilities.add, lower case (keep in step with the chart).
CAPS="sys_ptrace dac_read_search sys_chroot sys_module"
caps_demo() {  # caps_demo NAME "CAPS" DEMO-ARGS...: sets DEMO_RC, output in $OUT/$S-NAME.out
    _n=$1 _caps=$2; shift 2
    _bset=-all
    for _c in $_caps; do _bset="$_bset,+$_c"; done
    rm -rf $D
    unshare -p -f --mount-proc $SETPRIV --no-new-privs --inh-caps=-all --bounding-set="$_bset" \
        $BIN demo --dir $D --host-root $HR "$@" > "$OUT/$S-$_n.out" 2>&1
    DEMO_RC=$?
    sed "s/^/  | /" "$OUT/$S-$_n.out" | tail -25
}
without() { for _c in $CAPS; do [ "$_c" = "$1" ] || printf '%s ' "$_c"; done; }
if ! cli_ready; then skip "$S" "awaits the CLI"; elif [ ! -x $SETPRIV ]; then
    fail "$S.setpriv" "util-linux setpriv missing in the guest"
else
    ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
    raw_restore $VIRTIO virtio-pci
    mkdir -p $HR
    mount -o rbind / $HR
    # A process of another uid (a tenant pod's): its /proc/<pid>/fd is 0500 nobody.
    $SETPRIV --reuid=65534 --regid=65534 --clear-groups sleep 600 &
    TENANT=$!

    caps_demo full "$CAPS" --gpu-id 1af4:1041 --claim $VIRTIO
    DETAIL="rc=$DEMO_RC: $(tail -3 "$OUT/$S-full.out")"
    check "$S.lifecycle-with-only-the-daemonsets-capabilities" test $DEMO_RC -eq 0
    check "$S.ran-without-privilege" grep -q "host: $VIRTIO is on vfio-pci" "$OUT/$S-full.out"
    DETAIL="driver $(drv $VIRTIO) override $(ovr $VIRTIO)"
    check "$S.unprepared-back-to-virtio" sh -c "[ $(drv $VIRTIO) = virtio-pci ] && [ '$(ovr $VIRTIO)' = '(null)' ]"

    caps_demo prebound "$CAPS" --gpu-id 8086:10d3 --claim $E1000E
    DETAIL="rc=$DEMO_RC: $(tail -3 "$OUT/$S-prebound.out")"
    check "$S.prebound-scan-reads-every-uid" test $DEMO_RC -eq 0

    G=$(grp $E1000E)
    sleep 600 < /dev/vfio/$G &
    HOLDER=$!
    sleep 1
    caps_demo held "$CAPS" --gpu-id 8086:10d3 --claim $E1000E
    DETAIL="rc=$DEMO_RC: $(grep -m1 -i 'holds\|fail' "$OUT/$S-held.out")"
    check "$S.no-hostpid-sees-host-holder-by-host-pid" sh -c \
        "[ $DEMO_RC -ne 0 ] && grep -q 'pid $HOLDER) holds /dev/vfio/$G' '$OUT/$S-held.out'"
    kill $HOLDER; wait $HOLDER 2>/dev/null

    for c in sys_ptrace dac_read_search; do
        caps_demo "no-$c" "$(without $c)" --gpu-id 8086:10d3 --claim $E1000E
        DETAIL="rc=$DEMO_RC: $(grep -m1 -i 'denied\|fail' "$OUT/$S-no-$c.out")"
        check "$S.without-$c-fails-closed" sh -c \
            "[ $DEMO_RC -ne 0 ] && grep -q 'Permission denied' '$OUT/$S-no-$c.out'"
        DETAIL="driver $(drv $E1000E)"
        check "$S.without-$c-nothing-moved" test "$(drv $E1000E)" = vfio-pci
    done
    kill $TENANT 2>/dev/null; wait $TENANT 2>/dev/null
    umount -l $HR 2>/dev/null
fi
