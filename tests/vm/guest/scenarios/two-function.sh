# e1000 (00:04.0) and pci-testdev (00:04.1) share a slot and an IOMMU group:
# both go to vfio-pci together and both come back (e1000 -> e1000, testdev -> none).
S=two-function
if cli_scenario "$S" "--gpu-id 8086:100e"; then
    cli_ok "$S.devices" devices --output json
    cli_ok "$S.bind" bind $E1000 --output json
    check "$S.fn0-vfio" is_drv $E1000 vfio-pci
    check "$S.fn1-vfio" is_drv $TESTDEV vfio-pci
    check "$S.vfio-node" has_vfio_node $E1000
    check "$S.fn1-vfio-dev" has_vfio_node $TESTDEV
    cli_ok "$S.release" release $E1000 --output json
    check "$S.fn0-back-e1000" is_drv $E1000 e1000
    check "$S.fn1-back-none" is_drv $TESTDEV none
    check "$S.fn0-override-cleared" is_ovr $E1000 "(null)"
    check "$S.fn1-override-cleared" is_ovr $TESTDEV "(null)"
    check "$S.netdev-back" has_netdev $E1000
    check "$S.vfio-node-gone" no_vfio_node $E1000
fi
raw_restore $E1000 e1000
raw_restore $TESTDEV none
