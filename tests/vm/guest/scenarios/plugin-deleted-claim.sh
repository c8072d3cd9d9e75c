# A claim deleted while prepared (a force-deleted pod) whose VM still runs: the hook
# holds /dev/vfio/<group> open as QEMU would. The plugin's periodic cleanup releases
# a completed claim whose object is gone only once no process held its vfio devices
# on two cleanups in a row, so the device stays on vfio-pci through several cleanups
# (and periodic reconciles); the kubelet's later unprepare releases it.
S=plugin-deleted-claim
WAIT=6   # seconds with the claim gone: >= 5 cleanups (1 s), >= 2 reconciles (2 s)
if ! cli_ready; then skip "$S" "awaits the CLI"; else
    ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
    raw_restore $VIRTIO virtio-pci
    rm -rf /tmp/$S /tmp/$S.drv-*
    G=$(grp $VIRTIO)
    # fd 9 (the "VM") stays open in the hook's shell and its sleep.
    hook="exec 9<>/dev/vfio/$G; readlink $PCI/$VIRTIO/driver > /tmp/$S.drv-before; sleep $WAIT; readlink $PCI/$VIRTIO/driver > /tmp/$S.drv-after"
    VFIO_GPU_DRA_LOG=info $BIN demo --dir /tmp/$S --host-root / --gpu-id 1af4:1041 \
        --claim $VIRTIO --delete-claim-after-prepare --cleanup-interval 1 --reconcile-interval 2 \
        --between-prepare-and-unprepare "$hook" > "$OUT/$S.out" 2>&1
    rc=$?
    sed "s/^/  | /" "$OUT/$S.out"
    DETAIL="rc=$rc: $(tail -3 "$OUT/$S.out")"
    check "$S.lifecycle-ran" test $rc -eq 0
    check "$S.claim-deleted" grep -q "ResourceClaim vms/vm-gpus deleted" "$OUT/$S.out"
    before=$(basename "$(cat /tmp/$S.drv-before 2>/dev/null)")
    after=$(basename "$(cat /tmp/$S.drv-after 2>/dev/null)")
    DETAIL="driver right after the deletion: ${before:-none}"
    check "$S.prepared-on-vfio" test "$before" = vfio-pci
    DETAIL="driver ${WAIT}s (cleanups every 1 s) after the deletion: ${after:-none}"
    check "$S.kept-through-cleanups" test "$after" = vfio-pci
    DETAIL=$(grep "cleanup: half-prepared claim" "$OUT/$S.out" | head -1)
    check "$S.cleanup-did-not-act" sh -c "! grep -q 'cleanup: half-prepared claim' '$OUT/$S.out'"
    check "$S.unprepare-back-to-virtio" is_drv $VIRTIO virtio-pci
    check "$S.override-cleared" is_ovr $VIRTIO "(null)"
    check "$S.cdi-specs-removed" grep -q "CDI specs left: 0" "$OUT/$S.out"
fi
raw_restore $VIRTIO virtio-pci
