# Round trip vfio-pci and back for virtio-net, $ITER times: through our CLI
# (bind + release) vs. the same sysfs writes from a plain shell loop.
S=measure
ITER=${MEASURE_ITER:-20}
raw_restore $VIRTIO virtio-pci
t0=$(now_ms)
i=0; ok=yes
while [ $i -lt $ITER ]; do
    raw_to_vfio $VIRTIO
    [ "$(drv $VIRTIO)" = vfio-pci ] || ok="no: iteration $i not on vfio-pci"
    raw_back $VIRTIO
    [ "$(drv $VIRTIO)" = virtio-pci ] || ok="no: iteration $i not back on virtio-pci"
    i=$((i + 1))
done
t1=$(now_ms)
raw_ms=$((t1 - t0))
check "$S.shell-loop-correct" test "$ok" = yes
echo "METRIC measure.shell.total_ms $raw_ms"
echo "METRIC measure.shell.per_roundtrip_ms $((raw_ms / ITER))"
if ! cli_ready; then skip "$S.cli" "awaits the CLI"; else
    new_state "$S"
    GPU_IDS="--gpu-id 1af4:1041"
    t0=$(now_ms)
    i=0; ok=yes
    while [ $i -lt $ITER ]; do
        $BIN bind $VIRTIO --state-dir "$STATE" $GPU_IDS > /dev/null 2>"$OUT/measure.err" || ok="no: bind $i failed: $(cat "$OUT/measure.err")"
        [ "$(drv $VIRTIO)" = vfio-pci ] || ok="no: iteration $i not on vfio-pci"
        $BIN release $VIRTIO --state-dir "$STATE" $GPU_IDS > /dev/null 2>"$OUT/measure.err" || ok="no: release $i failed: $(cat "$OUT/measure.err")"
        [ "$(drv $VIRTIO)" = virtio-pci ] || ok="no: iteration $i not back on virtio-pci"
        i=$((i + 1))
    done
    t1=$(now_ms)
    cli_ms=$((t1 - t0))
    DETAIL=$ok
    check "$S.cli-loop-correct" test "$ok" = yes
    echo "METRIC measure.cli.total_ms $cli_ms"
    echo "METRIC measure.cli.per_roundtrip_ms $((cli_ms / ITER))"
    t0=$(now_ms)
    i=0
    while [ $i -lt $ITER ]; do $BIN devices $GPU_IDS > /dev/null 2>&1; i=$((i + 1)); done
    t1=$(now_ms)
    echo "METRIC measure.cli.devices_ms $(((t1 - t0) / ITER))"
    awk -v c=$cli_ms -v r=$raw_ms 'BEGIN { if (r > 0) printf "METRIC measure.ratio %.2f\n", c / r }'
    # The plugin is one long-lived process: measure the engine inside one
    # process too, so process start-up under TCG does not count.
    new_state "$S-inprocess"
    rt=$($BIN roundtrip $VIRTIO --iterations $ITER --state-dir "$STATE" $GPU_IDS 2>"$OUT/measure.err")
    check "$S.inprocess-ran" test -n "$rt"
    check "$S.inprocess-restored" test "$(drv $VIRTIO)" = virtio-pci
    inproc_ms=$(echo "$rt" | sed -n 's/.*"totalMs":\([0-9.]*\).*/\1/p')
    echo "METRIC measure.inprocess.total_ms $inproc_ms"
    awk -v c="$inproc_ms" -v r=$raw_ms -v n=$ITER 'BEGIN { if (r > 0 && c > 0) { printf "METRIC measure.inprocess.per_roundtrip_ms %.2f\n", c / n; printf "METRIC measure.inprocess.ratio %.2f\n", c / r } }'
fi
raw_restore $VIRTIO virtio-pci
