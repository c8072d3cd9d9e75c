# Between tenants on a real kernel: virtio-net behind a root port is reset
# through its `reset` attribute after a release and verified (the ledger's
# hand-over record says so). With its reset methods disabled (`reset_method`
# cleared, so `reset` fails with ENOTTY) a release quarantines it on vfio-pci,
# a bind is refused, and the admin's `reset` (methods restored) clears it;
# reconcile then returns it to virtio-pci.
S=reset
if cli_scenario "$S" "--gpu-id 1af4:1041"; then
    echo "RESET-METHOD-VIRTIO $(cat /sys/bus/pci/devices/$VIRTIO/reset_method 2>/dev/null || echo none)"
    cli_ok "$S.bind" bind $VIRTIO --output json
    cli_ok "$S.release" release $VIRTIO --output json
    check "$S.released-virtio-pci" is_drv $VIRTIO virtio-pci
    cli "$S.ledger" ledger --output json
    check "$S.handover-clean" grep -q '"verification": "clean"' "$OUT/$S.ledger.out"
    check "$S.handover-reset" grep -q '"resetMethod": "reset attribute' "$OUT/$S.ledger.out"
    check "$S.not-quarantined" sh -c "! grep -q quarantined $OUT/$S.ledger.out"

    cli_ok "$S.bind2" bind $VIRTIO --output json
    echo > /sys/bus/pci/devices/$VIRTIO/reset_method
    cli_ok "$S.release-broken" release $VIRTIO --output json
    check "$S.quarantined-on-vfio" is_drv $VIRTIO vfio-pci
    cli "$S.ledger-quarantined" ledger --output json
    check "$S.ledger-says-quarantined" grep -q '"quarantined"' "$OUT/$S.ledger-quarantined.out"
    cli "$S.bind-refused" bind $VIRTIO --output json
    check "$S.bind-refused-rc" is_rc "$RC" 2 "$S.bind-refused"
    cli "$S.reset-still-broken" reset $VIRTIO --output json
    check "$S.reset-still-broken-rc" is_rc "$RC" 2 "$S.reset-still-broken"
    echo default > /sys/bus/pci/devices/$VIRTIO/reset_method
    cli_ok "$S.reset" reset $VIRTIO --output json
    cli_ok "$S.reconcile" reconcile --output json
    check "$S.back-virtio-pci" is_drv $VIRTIO virtio-pci
    check "$S.override-cleared" is_ovr $VIRTIO "(null)"
    cli "$S.ledger-cleared" ledger --output json
    check "$S.cleared" sh -c "! grep -q '\"quarantined\"' $OUT/$S.ledger-cleared.out"
fi
echo default > /sys/bus/pci/devices/$VIRTIO/reset_method 2>/dev/null
raw_restore $VIRTIO virtio-pci
