# The kubelet plugin on the real kernel: `vfio-gpu-dra demo --host-root /` runs
# `serve` (real sockets, real gRPC, the kube-rs client against an in-process API
# server on loopback) and drives it like the kubelet: register, publish, prepare a
# claim for the movable virtio-net and the pre-bound e1000e, unprepare.
S=plugin
if ! cli_ready; then skip "$S" "awaits the CLI"; else
    ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
    raw_restore $VIRTIO virtio-pci
    rm -rf /tmp/plugin-demo
    $BIN demo --dir /tmp/plugin-demo --host-root / --gpu-id 1af4:1041 --gpu-id 8086:10d3 \
        --claim $VIRTIO --claim $E1000E > "$OUT/plugin.out" 2>&1
    rc=$?
    DETAIL="rc=$rc: $(tail -5 "$OUT/plugin.out")"
    check "$S.lifecycle-ran" test $rc -eq 0
    sed "s/^/  | /" "$OUT/plugin.out"
    DETAIL=$(grep 'kubelet uses' "$OUT/plugin.out")
    check "$S.registered-v1" grep -q 'kubelet uses v1.DRAPlugin' "$OUT/plugin.out"
    check "$S.slice-published" grep -q "gpu-0000-02-00-0" "$OUT/plugin.out"
    check "$S.prepared-on-vfio" grep -q "host: $VIRTIO is on vfio-pci" "$OUT/plugin.out"
    check "$S.cdi-group-node" grep -q '"path": "/dev/vfio/' "$OUT/plugin.out"
    check "$S.cdi-no-env" sh -c "! grep -q PCI_RESOURCE_ '$OUT/plugin.out'"
    DETAIL="driver $(drv $VIRTIO)"
    check "$S.unprepared-back-to-virtio" test "$(drv $VIRTIO)" = virtio-pci
    DETAIL="override $(cat $PCI/$VIRTIO/driver_override)"
    check "$S.override-cleared" test "$(cat $PCI/$VIRTIO/driver_override)" = "(null)"
    DETAIL="driver $(drv $E1000E)"
    check "$S.prebound-stays-on-vfio" test "$(drv $E1000E)" = vfio-pci
    check "$S.prebound-reason" grep -q "stays on vfio-pci: modprobe" "$OUT/plugin.out"
    check "$S.cdi-specs-removed" grep -q "CDI specs left: 0" "$OUT/plugin.out"
    check "$S.sockets-removed" grep -q "sockets removed: true" "$OUT/plugin.out"
fi
