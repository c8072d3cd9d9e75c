# The iommufd backend through the plugin (`demo --host-root / --iommu-backend`),
# claiming virtio-net. With CONFIG_IOMMUFD + CONFIG_VFIO_DEVICE_CDEV (the iommufd
# test kernel): the CDI spec names /dev/iommu and the function's
# /dev/vfio/devices/vfioN; while prepared, iommufd-bind opens exactly those nodes
# and binds the device to an iommufd (VFIO_DEVICE_BIND_IOMMUFD, IOAS attach, a DMA
# map), as QEMU does for KubeVirt; unprepare removes the cdev and the spec. The
# legacy backend on the same kernel: a device fd through the spec's group node.
# Without the cdev (Debian's kernels) the iommufd claim must fail at prepare,
# naming VFIO_DEVICE_CDEV, and leave the device where it was.
S=iommufd
D=/tmp/iommufd-demo
TOOL=/bin/iommufd-bind
# hook_script KIND: the between-prepare-and-unprepare hook; records the spec, the
# device's sysfs cdev name and the tool's output, and always succeeds (checks below)
hook_script() {
    cat > "$OUT/$S-hook.sh" <<HOOK
spec=\$(ls $D/cdi/*.json | grep -v _metadata_ | head -1)
cp "\$spec" $OUT/$S-$1.spec
ls $PCI/$VIRTIO/vfio-dev > $OUT/$S-$1.sysfs-name 2>&1
if [ "$1" = cdev ]; then
    set -- \$(grep -o '"/dev/iommu"' "\$spec" | tr -d '"') \$(grep -o '"/dev/vfio/devices/vfio[0-9]*"' "\$spec" | tr -d '"')
    $TOOL cdev "\$@" > $OUT/$S-$1.tool 2>&1
else
    set -- \$(grep -o '"/dev/vfio/vfio"' "\$spec" | tr -d '"') \$(grep -o '"/dev/vfio/[0-9][0-9]*"' "\$spec" | tr -d '"')
    $TOOL group "\$@" $VIRTIO > $OUT/$S-$1.tool 2>&1
fi
echo "rc=\$?" >> $OUT/$S-$1.tool
exit 0
HOOK
}
demo_run() {  # demo_run BACKEND [HOOK]
    rm -rf $D
    if [ -n "${2:-}" ]; then
        $BIN demo --dir $D --host-root / --gpu-id 1af4:1041 --claim $VIRTIO --iommu-backend "$1" \
            --between-prepare-and-unprepare "sh $OUT/$S-hook.sh" > "$OUT/$S-$1.out" 2>&1
    else
        $BIN demo --dir $D --host-root / --gpu-id 1af4:1041 --claim $VIRTIO --iommu-backend "$1" \
            > "$OUT/$S-$1.out" 2>&1
    fi
    DEMO_RC=$?
    sed "s/^/  | /" "$OUT/$S-$1.out"
}
show() { [ -e "$1" ] && sed "s/^/  | $(basename "$1"): /" "$1"; }
if ! cli_ready; then skip "$S" "awaits the CLI"; else
    ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
    raw_restore $VIRTIO virtio-pci
    if [ -c /dev/iommu ]; then
        echo "NOTE $S: /dev/iommu present: the whole iommufd path"
        DETAIL="$TOOL missing (run.sh builds it for the iommufd kernel)"
        check "$S.tool-present" test -x $TOOL
        hook_script cdev
        demo_run iommufd hook
        DETAIL="rc=$DEMO_RC: $(tail -3 "$OUT/$S-iommufd.out")"
        check "$S.lifecycle-ran" test $DEMO_RC -eq 0
        show "$OUT/$S-cdev.spec"; show "$OUT/$S-cdev.sysfs-name"; show "$OUT/$S-cdev.tool"
        check "$S.config-seen" grep -q "iommuBackend iommufd" "$OUT/$S-iommufd.out"
        V=$(cat "$OUT/$S-cdev.sysfs-name" 2>/dev/null)
        DETAIL="spec $(tr -d '\n ' < "$OUT/$S-cdev.spec" 2>/dev/null | head -c 400)"
        check "$S.spec-names-dev-iommu" grep -q '"/dev/iommu"' "$OUT/$S-cdev.spec"
        check "$S.spec-names-the-functions-cdev" grep -q "\"/dev/vfio/devices/$V\"" "$OUT/$S-cdev.spec"
        check "$S.spec-names-no-group-node" sh -c "! grep -qE '\"/dev/vfio/([0-9]+|vfio)\"' '$OUT/$S-cdev.spec'"
        DETAIL=$(tr '\n' ';' < "$OUT/$S-cdev.tool" 2>/dev/null)
        check "$S.cdev-opened" grep -q "^ok open /dev/vfio/devices/$V" "$OUT/$S-cdev.tool"
        check "$S.bind-iommufd" grep -q "^ok VFIO_DEVICE_BIND_IOMMUFD" "$OUT/$S-cdev.tool"
        check "$S.attach-ioas" grep -q "^ok VFIO_DEVICE_ATTACH_IOMMUFD_PT" "$OUT/$S-cdev.tool"
        check "$S.dma-map" grep -q "^ok IOMMU_IOAS_MAP" "$OUT/$S-cdev.tool"
        check "$S.device-info-pci" grep -q "^ok VFIO_DEVICE_GET_INFO .*pci=1" "$OUT/$S-cdev.tool"
        check "$S.tool-rc" grep -qx "rc=0" "$OUT/$S-cdev.tool"
        DETAIL="driver $(drv $VIRTIO), override $(ovr $VIRTIO)"
        check "$S.unprepared-back-to-virtio" sh -c "[ $(drv $VIRTIO) = virtio-pci ] && [ '$(ovr $VIRTIO)' = '(null)' ]"
        DETAIL="/dev/vfio/devices/$V still there"
        check "$S.cdev-gone" test -n "$V" -a ! -e "/dev/vfio/devices/$V"
        check "$S.cdi-specs-removed" grep -q "CDI specs left: 0" "$OUT/$S-iommufd.out"
        # the legacy group backend on the same kernel, same device
        hook_script group
        demo_run legacy hook
        DETAIL="rc=$DEMO_RC: $(tail -3 "$OUT/$S-legacy.out")"
        check "$S.legacy-lifecycle-ran" test $DEMO_RC -eq 0
        show "$OUT/$S-group.spec"; show "$OUT/$S-group.tool"
        G=$(grp $VIRTIO)
        DETAIL="spec $(tr -d '\n ' < "$OUT/$S-group.spec" 2>/dev/null | head -c 400)"
        check "$S.legacy-spec-group-node" grep -q "\"/dev/vfio/$G\"" "$OUT/$S-group.spec"
        check "$S.legacy-spec-no-cdev" sh -c "! grep -q '/dev/vfio/devices/\|/dev/iommu' '$OUT/$S-group.spec'"
        DETAIL=$(tr '\n' ';' < "$OUT/$S-group.tool" 2>/dev/null)
        check "$S.legacy-container-type1" grep -q "^ok VFIO_SET_IOMMU" "$OUT/$S-group.tool"
        check "$S.legacy-device-fd" grep -q "^ok VFIO_GROUP_GET_DEVICE_FD $VIRTIO" "$OUT/$S-group.tool"
        check "$S.legacy-tool-rc" grep -qx "rc=0" "$OUT/$S-group.tool"
        DETAIL="driver $(drv $VIRTIO)"
        check "$S.legacy-back-to-virtio" is_drv $VIRTIO virtio-pci
    else
        echo "NOTE $S: no /dev/iommu (CONFIG_IOMMUFD off): an iommufd claim must fail cleanly"
        demo_run iommufd
        DETAIL="rc=$DEMO_RC"
        check "$S.prepare-refused" test $DEMO_RC -ne 0
        DETAIL=$(grep -i "prepare\|error" "$OUT/$S-iommufd.out" | tail -3)
        check "$S.error-names-vfio-device-cdev" grep -q "VFIO_DEVICE_CDEV" "$OUT/$S-iommufd.out"
        DETAIL=$(grep -rl /dev/vfio/devices $D/cdi 2>/dev/null)
        check "$S.no-spec-names-a-missing-cdev" sh -c "! grep -rq /dev/vfio/devices $D/cdi"
        DETAIL="driver $(drv $VIRTIO), override $(ovr $VIRTIO)"
        check "$S.device-back-on-virtio" sh -c "[ $(drv $VIRTIO) = virtio-pci ] && [ '$(ovr $VIRTIO)' = '(null)' ]"
    fi
    raw_restore $VIRTIO virtio-pci
fi
