# Raw sysfs: the boot left the devices where the reference topology says.
# $PREBOUND (from /etc/vm/env) = yes when vfio-pci ids= should have claimed E1000E.
if [ "$PREBOUND" = yes ]; then
    check baseline.e1000e-on-vfio is_drv $E1000E vfio-pci
    check baseline.e1000e-vfio-node has_vfio_node $E1000E
    check baseline.vfio-ids-logged sh -c 'dmesg | grep -q "vfio_pci: add \[8086:10d3"' 
else
    check baseline.e1000e-on-e1000e is_drv $E1000E e1000e
fi
check baseline.e1000e-override-unset is_ovr $E1000E "(null)"
check baseline.virtio-on-virtio-pci is_drv $VIRTIO virtio-pci
check baseline.virtio-netdev has_netdev $VIRTIO
check baseline.e1000-on-e1000 is_drv $E1000 e1000
check baseline.testdev-unbound is_drv $TESTDEV none
check baseline.edu-unbound is_drv $EDU none
check baseline.e1000e-own-group members_are $E1000E "$E1000E"
check baseline.virtio-own-group members_are $VIRTIO "$VIRTIO"
check baseline.multifunction-shared-group members_are $E1000 "$E1000 $TESTDEV"
check baseline.edu-own-group members_are $EDU "$EDU"
check baseline.vfio-pci-driver-dir test -d /sys/bus/pci/drivers/vfio-pci
check baseline.vfio-pci-is-module test -e /sys/module/vfio_pci/initstate
check baseline.modules-builtin-present test -s /lib/modules/$(uname -r)/modules.builtin
check baseline.iommu-on test -d /sys/class/iommu/dmar0
emit baseline.lspci lspci_lite
