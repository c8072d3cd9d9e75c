# virtio-net on virtio-pci -> bind -> vfio-pci -> release -> virtio-pci again.
S=runtime-move
if cli_scenario "$S" "--gpu-id 1af4:1041"; then
    cli_ok "$S.devices" devices --output json
    cli_ok "$S.bind" bind $VIRTIO --output json
    check "$S.bound-vfio" is_drv $VIRTIO vfio-pci
    check "$S.vfio-node" has_vfio_node $VIRTIO
    cli "$S.devices-bound" devices --output json
    cli "$S.ledger-bound" ledger --output json
    check "$S.ledger-rc" is_rc "$RC" 0 "$S.ledger-bound"
    cli_ok "$S.bind-again" bind $VIRTIO --output json
    check "$S.bind-again-still-vfio" is_drv $VIRTIO vfio-pci
    cli_ok "$S.release" release $VIRTIO --output json
    check "$S.released-virtio-pci" is_drv $VIRTIO virtio-pci
    check "$S.override-cleared" is_ovr $VIRTIO "(null)"
    check "$S.netdev-back" has_netdev $VIRTIO
    check "$S.vfio-node-gone" no_vfio_node $VIRTIO
    cli_ok "$S.release-again" release $VIRTIO --output json
    check "$S.release-again-virtio-pci" is_drv $VIRTIO virtio-pci
    cli "$S.devices-after" devices --output json
fi
raw_restore $VIRTIO virtio-pci
