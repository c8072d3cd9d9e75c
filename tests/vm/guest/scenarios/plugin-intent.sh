# Intent added while a claim is prepared: the running plugin prepares virtio-net
# for a claim, then the admin writes a driverctl override for it; the kubelet's
# unprepare must leave it on vfio-pci and say why (the engine re-reads intent at
# every operation, not once at start).
S=plugin-intent
DC=/etc/driverctl.d/pci-$VIRTIO
if ! cli_ready; then skip "$S" "awaits the CLI"; else
    ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
    raw_restore $VIRTIO virtio-pci
    rm -rf /tmp/$S "$DC" /tmp/$S.drv-at-hook
    hook="readlink $PCI/$VIRTIO/driver > /tmp/$S.drv-at-hook; mkdir -p /etc/driverctl.d && echo vfio-pci > $DC"
    VFIO_GPU_DRA_LOG=info $BIN demo --dir /tmp/$S --host-root / --gpu-id 1af4:1041 \
        --claim $VIRTIO --between-prepare-and-unprepare "$hook" > "$OUT/$S.out" 2>&1
    rc=$?
    sed "s/^/  | /" "$OUT/$S.out"
    DETAIL="rc=$rc: $(tail -3 "$OUT/$S.out")"
    check "$S.lifecycle-ran" test $rc -eq 0
    at_hook=$(basename "$(cat /tmp/$S.drv-at-hook 2>/dev/null)")
    DETAIL="driver while prepared: ${at_hook:-none}"
    check "$S.prepared-on-vfio" test "$at_hook" = vfio-pci
    check "$S.stays-on-vfio-after-unprepare" is_drv $VIRTIO vfio-pci
    check "$S.vfio-node-kept" has_vfio_node $VIRTIO
    DETAIL="no 'stays on vfio-pci: driverctl' in the demo's verdict: $(grep -A2 "$VIRTIO on" "$OUT/$S.out" | tail -2)"
    check "$S.verdict-says-driverctl" grep -q "stays on vfio-pci: driverctl" "$OUT/$S.out"
    # the demo reads the plugin's ledger: the override is the plugin's, not a stranger's
    DETAIL=$(grep "this plugin did not write it" "$OUT/$S.out")
    check "$S.verdict-knows-own-override" sh -c "! grep -q 'this plugin did not write it' '$OUT/$S.out'"
    # the plugin's own account of the unprepare (its info log), not just inspect's
    DETAIL="release log: $(grep ' released' "$OUT/$S.out" | head -1)"
    check "$S.release-says-driverctl" sh -c "grep ' released' '$OUT/$S.out' | grep -E 'left-on-vfio|LeftOnVfio' | grep -q driverctl"
    check "$S.cdi-specs-removed" grep -q "CDI specs left: 0" "$OUT/$S.out"
    # the admin drops the override: an ordinary raw move brings it back
    rm -f "$DC"
fi
raw_restore $VIRTIO virtio-pci
