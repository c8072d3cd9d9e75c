// Guest test tool for tests/vm: opens a vfio device the way QEMU does for
// KubeVirt, through the nodes the plugin's CDI spec named, and reports each step.
//
//   iommufd-bind cdev IOMMU_DEV VFIO_CDEV   e.g. /dev/iommu /dev/vfio/devices/vfio0
//     open both; VFIO_DEVICE_BIND_IOMMUFD; IOMMU_IOAS_ALLOC;
//     VFIO_DEVICE_ATTACH_IOMMUFD_PT to the IOAS; IOMMU_IOAS_MAP a 2 MiB buffer at
//     IOVA 0 and unmap it; VFIO_DEVICE_GET_INFO; detach.
//   iommufd-bind group CONTAINER GROUP BDF  e.g. /dev/vfio/vfio /dev/vfio/7 0000:02:00.0
//     the legacy path: VFIO_GROUP_SET_CONTAINER, VFIO_SET_IOMMU(TYPE1),
//     VFIO_GROUP_GET_DEVICE_FD, VFIO_DEVICE_GET_INFO.
//
// Prints "ok <step> ..." per step and "FAILED <step>: <errno>" then exits 1 on the
// first failure. C, static, built on the host against the test kernel's uAPI
// headers (make headers_install): the guest has only busybox, and neither
// bookworm's linux-libc-dev (6.1) nor a Rust crate here has the iommufd ioctls.
#include <errno.h>
#include <fcntl.h>
#include <linux/iommufd.h>
#include <linux/vfio.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

static int failed(const char *step) {
    printf("FAILED %s: %s\n", step, strerror(errno));
    return 1;
}

static int open_node(const char *path) {
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        printf("FAILED open %s: %s\n", path, strerror(errno));
    else
        printf("ok open %s\n", path);
    return fd;
}

static int device_info(int dev) {
    struct vfio_device_info info = {.argsz = sizeof(info)};
    if (ioctl(dev, VFIO_DEVICE_GET_INFO, &info))
        return failed("VFIO_DEVICE_GET_INFO");
    printf("ok VFIO_DEVICE_GET_INFO flags=0x%x pci=%d regions=%u irqs=%u\n", info.flags,
           (info.flags & VFIO_DEVICE_FLAGS_PCI) != 0, info.num_regions, info.num_irqs);
    return 0;
}

static int cdev(const char *iommu_path, const char *cdev_path) {
    int iommufd = open_node(iommu_path);
    if (iommufd < 0)
        return 1;
    int dev = open_node(cdev_path);
    if (dev < 0)
        return 1;
    struct vfio_device_bind_iommufd bind = {.argsz = sizeof(bind), .iommufd = iommufd};
    if (ioctl(dev, VFIO_DEVICE_BIND_IOMMUFD, &bind))
        return failed("VFIO_DEVICE_BIND_IOMMUFD");
    printf("ok VFIO_DEVICE_BIND_IOMMUFD devid=%u\n", bind.out_devid);
    struct iommu_ioas_alloc alloc = {.size = sizeof(alloc)};
    if (ioctl(iommufd, IOMMU_IOAS_ALLOC, &alloc))
        return failed("IOMMU_IOAS_ALLOC");
    printf("ok IOMMU_IOAS_ALLOC ioas=%u\n", alloc.out_ioas_id);
    struct vfio_device_attach_iommufd_pt attach = {.argsz = sizeof(attach),
                                                   .pt_id = alloc.out_ioas_id};
    if (ioctl(dev, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &attach))
        return failed("VFIO_DEVICE_ATTACH_IOMMUFD_PT");
    printf("ok VFIO_DEVICE_ATTACH_IOMMUFD_PT pt=%u\n", attach.pt_id);
    // What QEMU does next with guest RAM: map it for the device's DMA.
    size_t len = 2u << 20;
    void *buf = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED)
        return failed("mmap");
    struct iommu_ioas_map map = {
        .size = sizeof(map),
        .flags = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE,
        .ioas_id = alloc.out_ioas_id,
        .user_va = (uintptr_t)buf,
        .length = len,
        .iova = 0,
    };
    if (ioctl(iommufd, IOMMU_IOAS_MAP, &map))
        return failed("IOMMU_IOAS_MAP");
    printf("ok IOMMU_IOAS_MAP iova=0x%llx length=0x%llx\n", (unsigned long long)map.iova,
           (unsigned long long)map.length);
    struct iommu_ioas_unmap unmap = {
        .size = sizeof(unmap), .ioas_id = alloc.out_ioas_id, .iova = 0, .length = len};
    if (ioctl(iommufd, IOMMU_IOAS_UNMAP, &unmap))
        return failed("IOMMU_IOAS_UNMAP");
    printf("ok IOMMU_IOAS_UNMAP length=0x%llx\n", (unsigned long long)unmap.length);
    if (device_info(dev))
        return 1;
    struct vfio_device_detach_iommufd_pt detach = {.argsz = sizeof(detach)};
    if (ioctl(dev, VFIO_DEVICE_DETACH_IOMMUFD_PT, &detach))
        return failed("VFIO_DEVICE_DETACH_IOMMUFD_PT");
    printf("ok VFIO_DEVICE_DETACH_IOMMUFD_PT\n");
    close(dev);
    close(iommufd);
    return 0;
}

static int group(const char *container_path, const char *group_path, const char *bdf) {
    int container = open_node(container_path);
    if (container < 0)
        return 1;
    int grp = open_node(group_path);
    if (grp < 0)
        return 1;
    struct vfio_group_status status = {.argsz = sizeof(status)};
    if (ioctl(grp, VFIO_GROUP_GET_STATUS, &status))
        return failed("VFIO_GROUP_GET_STATUS");
    if (!(status.flags & VFIO_GROUP_FLAGS_VIABLE)) {
        printf("FAILED VFIO_GROUP_GET_STATUS: group not viable (flags 0x%x)\n", status.flags);
        return 1;
    }
    printf("ok VFIO_GROUP_GET_STATUS viable\n");
    if (ioctl(grp, VFIO_GROUP_SET_CONTAINER, &container))
        return failed("VFIO_GROUP_SET_CONTAINER");
    printf("ok VFIO_GROUP_SET_CONTAINER\n");
    if (ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU))
        return failed("VFIO_SET_IOMMU");
    printf("ok VFIO_SET_IOMMU type1v2\n");
    int dev = ioctl(grp, VFIO_GROUP_GET_DEVICE_FD, bdf);
    if (dev < 0)
        return failed("VFIO_GROUP_GET_DEVICE_FD");
    printf("ok VFIO_GROUP_GET_DEVICE_FD %s\n", bdf);
    if (device_info(dev))
        return 1;
    close(dev);
    close(grp);
    close(container);
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc == 4 && strcmp(argv[1], "cdev") == 0)
        return cdev(argv[2], argv[3]);
    if (argc == 5 && strcmp(argv[1], "group") == 0)
        return group(argv[2], argv[3], argv[4]);
    fprintf(stderr, "usage: %s cdev IOMMU_DEV VFIO_CDEV | group CONTAINER GROUP BDF\n", argv[0]);
    return 2;
}
