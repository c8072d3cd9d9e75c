# Someone else wrote vfio-pci into edu's driver_override and probed it before
# our tool ran: devices says keepOnVfio (source driver-override); release leaves it.
S=foreign-override
echo vfio-pci > $PCI/$EDU/driver_override
echo $EDU > /sys/bus/pci/drivers_probe
check "$S.setup-on-vfio" is_drv $EDU vfio-pci
if cli_scenario "$S" "--gpu-id 1234:11e8"; then
    cli_ok "$S.devices" devices --output json
    cli_ok "$S.release" release $EDU --output json
    check "$S.stays-vfio" is_drv $EDU vfio-pci
    check "$S.override-kept" is_ovr $EDU vfio-pci
    cli_ok "$S.bind" bind $EDU --output json
    check "$S.bind-stays-vfio" is_drv $EDU vfio-pci
    cli_ok "$S.reconcile" reconcile --output json
    check "$S.reconcile-leaves-it" is_drv $EDU vfio-pci
    check "$S.reconcile-override-kept" is_ovr $EDU vfio-pci
fi
raw_restore $EDU none
check "$S.cleanup" is_drv $EDU none
