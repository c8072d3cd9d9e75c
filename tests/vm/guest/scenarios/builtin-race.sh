# A built-in host driver wins the race (Debian's 6.12: virtio_pci is built in).
# The command line names virtio-net in vfio-pci.ids, but virtio_pci bound it at PCI
# enumeration, before /init loaded the vfio-pci module: the shape of a GPU the
# command line names, sitting on its host driver. The administrator's intent
# stands: devices says keepOnVfio from kernel-cmdline, bind moves it, release keeps
# it on vfio-pci, explain says why.
S=builtin-race
DETAIL="virtio_pci not in modules.builtin"
check "$S.virtio-pci-built-in" grep -qE '(^|/)virtio_pci\.ko$' "/lib/modules/$(uname -r)/modules.builtin"
DETAIL="$(cat /proc/cmdline)"
check "$S.cmdline-names-virtio" sh -c 'grep -qE "vfio-pci.ids=[^ ]*1af4:1041" /proc/cmdline'
check "$S.host-driver-won" is_drv $VIRTIO virtio-pci
check "$S.vfio-pci-has-the-id" sh -c 'dmesg | grep -q "vfio_pci: add \[1af4:1041"'
if cli_scenario "$S" "--gpu-id 1af4:1041"; then
    cli_ok "$S.devices" devices --output json
    cli_ok "$S.explain" explain $VIRTIO
    DETAIL="explain: $(tr '\n' ' ' < "$OUT/$S.explain.out" | head -c 300)"
    check "$S.explain-names-cmdline" grep -qi "kernel.cmdline\|vfio-pci.ids" "$OUT/$S.explain.out"
    check "$S.explain-keeps-on-vfio" grep -qi "keep\|stays" "$OUT/$S.explain.out"
    cli_ok "$S.bind" bind $VIRTIO --output json
    check "$S.bind-moved-to-vfio" is_drv $VIRTIO vfio-pci
    check "$S.vfio-node" has_vfio_node $VIRTIO
    cli_ok "$S.release" release $VIRTIO --output json
    check "$S.release-keeps-vfio" is_drv $VIRTIO vfio-pci
    check "$S.vfio-node-kept" has_vfio_node $VIRTIO
    cli_ok "$S.reconcile" reconcile --output json
    check "$S.reconcile-keeps-vfio" is_drv $VIRTIO vfio-pci
    cli "$S.devices-after" devices --output json
    cli "$S.explain-after" explain $VIRTIO
fi
