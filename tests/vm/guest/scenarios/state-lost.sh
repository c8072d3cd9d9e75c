# The state directory is lost while a device is bound (a reinstall with another
# state dir, a wiped hostPath): the boot mirror of the ledger under
# /run/vfio-gpu-dra still knows the device came from virtio-pci, so a release
# from the new state dir returns it there. Our own driver_override=vfio-pci is
# not mistaken for the admin's intent (issue "core promise", item 6).
S=state-lost
if ! cli_ready; then skip "$S" "awaits the CLI"; else
    GPU_IDS="--gpu-id 1af4:1041"
    # A reinstall with another state dir.
    new_state "$S-old"
    cli_ok "$S.bind" bind $VIRTIO --output json
    check "$S.bound-vfio" is_drv $VIRTIO vfio-pci
    check "$S.mirror-written" test -d /run/vfio-gpu-dra
    rm -rf "$STATE"
    STATE=/var/lib/vfio-gpu-dra-$S-new
    rm -rf "$STATE"; mkdir -p "$STATE"
    cli_ok "$S.release-new-dir" release $VIRTIO --output json
    check "$S.new-dir-back-on-virtio-pci" is_drv $VIRTIO virtio-pci
    check "$S.new-dir-override-cleared" is_ovr $VIRTIO "(null)"
    # A wiped hostPath: the same state dir, empty again.
    new_state "$S-wiped"
    cli_ok "$S.bind-2" bind $VIRTIO --output json
    check "$S.bound-vfio-2" is_drv $VIRTIO vfio-pci
    rm -rf "$STATE"; mkdir -p "$STATE"
    cli_ok "$S.release-wiped" release $VIRTIO --output json
    check "$S.wiped-back-on-virtio-pci" is_drv $VIRTIO virtio-pci
    check "$S.wiped-override-cleared" is_ovr $VIRTIO "(null)"
fi
raw_restore $VIRTIO virtio-pci
