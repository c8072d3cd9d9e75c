# edu has no host driver: bound to vfio-pci, released back to no driver.
S=no-host-driver
if cli_scenario "$S" "--gpu-id 1234:11e8"; then
    cli_ok "$S.devices" devices --output json
    cli_ok "$S.bind" bind $EDU --output json
    check "$S.bound-vfio" is_drv $EDU vfio-pci
    check "$S.vfio-node" has_vfio_node $EDU
    cli_ok "$S.release" release $EDU --output json
    check "$S.back-none" is_drv $EDU none
    check "$S.override-cleared" is_ovr $EDU "(null)"
fi
raw_restore $EDU none
