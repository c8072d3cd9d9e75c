# edu has no host driver: bound to vfio-pci, released back to no driver.
S=no-host-driver
if ! cli_ready; then skip "$S" "awaits the CLI"; else
    new_state "$S"
    GPU_IDS="--gpu-id 1234:11e8"
    cli "$S.devices" devices --output json
    check "$S.devices-rc" is_rc "$RC" 0 "$S.devices"
    cli "$S.bind" bind $EDU --output json
    check "$S.bind-rc" is_rc "$RC" 0 "$S.bind"
    check "$S.bound-vfio" is_drv $EDU vfio-pci
    check "$S.vfio-node" has_vfio_node $EDU
    cli "$S.release" release $EDU --output json
    check "$S.release-rc" is_rc "$RC" 0 "$S.release"
    check "$S.back-none" is_drv $EDU none
    check "$S.override-cleared" is_ovr $EDU "(null)"
fi
raw_restore $EDU none
