# An administrator pre-bound E1000E to vfio-pci ($PREBOUND_SOURCE: kernel-cmdline
# or modprobe). devices reports keepOnVfio with that reason; bind is a no-op and
# release leaves it on vfio-pci.
S=prebound-$PREBOUND_SOURCE
if cli_scenario "$S" "--gpu-id 8086:10d3"; then
    cli_ok "$S.devices" devices --output json
    cli "$S.explain" explain $E1000E
    cli_ok "$S.bind" bind $E1000E --output json
    check "$S.bind-still-vfio" is_drv $E1000E vfio-pci
    check "$S.bind-override-untouched" is_ovr $E1000E "(null)"
    cli_ok "$S.release" release $E1000E --output json
    check "$S.release-stays-vfio" is_drv $E1000E vfio-pci
    check "$S.release-override-untouched" is_ovr $E1000E "(null)"
    check "$S.vfio-node-kept" has_vfio_node $E1000E
    cli_ok "$S.reconcile" reconcile --output json
    check "$S.reconcile-stays-vfio" is_drv $E1000E vfio-pci
    cli "$S.devices-after" devices --output json
fi
