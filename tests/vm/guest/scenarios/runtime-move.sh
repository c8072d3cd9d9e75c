# virtio-net on virtio-pci -> bind -> vfio-pci -> release -> virtio-pci again.
S=runtime-move
if ! cli_ready; then skip "$S" "awaits the CLI"; else
    new_state "$S"
    GPU_IDS="--gpu-id 1af4:1041"
    cli "$S.devices" devices --output json
    check "$S.devices-rc" is_rc "$RC" 0 "$S.devices"
    cli "$S.bind" bind $VIRTIO --output json
    check "$S.bind-rc" is_rc "$RC" 0 "$S.bind"
    check "$S.bound-vfio" is_drv $VIRTIO vfio-pci
    check "$S.vfio-node" has_vfio_node $VIRTIO
    cli "$S.devices-bound" devices --output json
    cli "$S.ledger-bound" ledger --output json
    check "$S.ledger-rc" is_rc "$RC" 0 "$S.ledger-bound"
    cli "$S.bind-again" bind $VIRTIO --output json
    check "$S.bind-again-rc" is_rc "$RC" 0 "$S.bind-again"
    check "$S.bind-again-still-vfio" is_drv $VIRTIO vfio-pci
    cli "$S.release" release $VIRTIO --output json
    check "$S.release-rc" is_rc "$RC" 0 "$S.release"
    check "$S.released-virtio-pci" is_drv $VIRTIO virtio-pci
    check "$S.override-cleared" is_ovr $VIRTIO "(null)"
    check "$S.netdev-back" has_netdev $VIRTIO
    check "$S.vfio-node-gone" no_vfio_node $VIRTIO
    cli "$S.release-again" release $VIRTIO --output json
    check "$S.release-again-rc" is_rc "$RC" 0 "$S.release-again"
    check "$S.release-again-virtio-pci" is_drv $VIRTIO virtio-pci
    cli "$S.devices-after" devices --output json
fi
raw_restore $VIRTIO virtio-pci
