# `doctor` on a real kernel: this guest is a ready node (IOMMU with interrupt
# remapping, vfio-pci a module, every test "GPU" in a clean group), so every
# check passes or warns and the exit status is 0. check.py reads the JSON and
# compares each check with what the guest's own sysfs says.
S=doctor-$PREBOUND_SOURCE
if cli_scenario "$S" "--gpu-id 8086:10d3 --gpu-id 1af4:1041 --gpu-id 8086:100e"; then
    cli "$S.json" doctor --output json
    check "$S.rc" is_rc "$RC" 0 "$S.json"
    cli_ok "$S.table" doctor
    # read-only: nothing moved, no ledger written
    check "$S.e1000e-untouched" is_drv $E1000E vfio-pci
    check "$S.virtio-untouched" is_drv $VIRTIO virtio-pci
    check "$S.e1000-untouched" is_drv $E1000 e1000
    check "$S.no-ledger-written" sh -c "[ ! -e $STATE/ledger.json ]"
fi
