# Guest topology created by run.sh's qemu command line (see tests/vm/README.md).
E1000E=0000:01:00.0    # 8086:10d3 behind root port 00:02.0, own group
VIRTIO=0000:02:00.0    # 1af4:1041 behind root port 00:03.0, own group, virtio-pci
E1000=0000:00:04.0     # 8086:100e, function 0 of a multifunction slot, e1000
TESTDEV=0000:00:04.1   # 1b36:0005 pci-testdev, function 1, no driver; same group as E1000
EDU=0000:00:05.0       # 1234:11e8 edu, no host driver exists
