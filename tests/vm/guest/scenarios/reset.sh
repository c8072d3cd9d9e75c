# Between tenants on a real kernel: virtio-net behind a root port is reset
# through its `reset` attribute after a release and verified (the ledger's
# hand-over record says so). With its reset methods disabled (`reset_method`
# cleared, so `reset` fails with ENOTTY) a release quarantines it on vfio-pci,
# a bind is refused, and the admin's `reset` (methods restored) clears it;
# reconcile then returns it to virtio-pci. Then a benchmark: a release with the
# reset against one without (METRIC reset.*).
S=reset
if cli_scenario "$S" "--gpu-id 1af4:1041"; then
    echo "RESET-METHOD-VIRTIO $(cat /sys/bus/pci/devices/$VIRTIO/reset_method 2>/dev/null || echo none)"
    cli_ok "$S.bind" bind $VIRTIO --output json
    cli_ok "$S.release" release $VIRTIO --output json
    check "$S.released-virtio-pci" is_drv $VIRTIO virtio-pci
    cli "$S.ledger" ledger --output json
    check "$S.handover-clean" grep -q '"verification": "clean"' "$OUT/$S.ledger.out"
    check "$S.handover-reset" grep -q '"resetMethod": "reset attribute' "$OUT/$S.ledger.out"
    check "$S.not-quarantined" sh -c "! grep -q quarantined $OUT/$S.ledger.out"

    cli_ok "$S.bind2" bind $VIRTIO --output json
    echo > /sys/bus/pci/devices/$VIRTIO/reset_method
    cli_ok "$S.release-broken" release $VIRTIO --output json
    check "$S.quarantined-on-vfio" is_drv $VIRTIO vfio-pci
    cli "$S.ledger-quarantined" ledger --output json
    check "$S.ledger-says-quarantined" grep -q '"quarantined"' "$OUT/$S.ledger-quarantined.out"
    cli "$S.bind-refused" bind $VIRTIO --output json
    check "$S.bind-refused-rc" is_rc "$RC" 2 "$S.bind-refused"
    cli "$S.reset-still-broken" reset $VIRTIO --output json
    check "$S.reset-still-broken-rc" is_rc "$RC" 2 "$S.reset-still-broken"
    echo default > /sys/bus/pci/devices/$VIRTIO/reset_method
    cli_ok "$S.reset" reset $VIRTIO --output json
    cli_ok "$S.reconcile" reconcile --output json
    check "$S.back-virtio-pci" is_drv $VIRTIO virtio-pci
    check "$S.override-cleared" is_ovr $VIRTIO "(null)"
    cli "$S.ledger-cleared" ledger --output json
    check "$S.cleared" sh -c "! grep -q '\"quarantined\"' $OUT/$S.ledger-cleared.out"

    # What the hand-over adds to a release on this kernel: the in-process
    # round trip (bind + release, one process, as the plugin runs) with the
    # reset and verification (sanitize "reset", the default) against the same
    # with sanitize "off", alternating, 3 pairs of BENCH_ITER round trips.
    BENCH_ITER=${RESET_BENCH_ITER:-10}
    sed 's/^models = { /models = { "1af4:1041" = "off", /' /etc/vfio-gpu-dra/policy.toml > /tmp/policy-off.toml
    roundtrip_ms() { # POLICY_FILE
        new_state "$S-bench"
        $BIN roundtrip $VIRTIO --iterations $BENCH_ITER --state-dir "$STATE" --policy "$1" $GPU_IDS 2>>"$OUT/$S.bench.err" |
            sed -n 's/.*"totalMs":\([0-9.]*\).*/\1/p'
    }
    with=0 without=0 runs=0
    for _pair in 1 2 3; do
        a=$(roundtrip_ms /etc/vfio-gpu-dra/policy.toml)
        b=$(roundtrip_ms /tmp/policy-off.toml)
        [ -n "$a" ] && [ -n "$b" ] && runs=$((runs + 1))
        with=$(awk -v s="$with" -v x="${a:-0}" 'BEGIN { print s + x }')
        without=$(awk -v s="$without" -v x="${b:-0}" 'BEGIN { print s + x }')
    done
    DETAIL="round trips did not all run: $(cat "$OUT/$S.bench.err" 2>/dev/null)"
    check "$S.bench-ran" test "$runs" = 3
    check "$S.bench-restored" is_drv $VIRTIO virtio-pci
    awk -v w="$with" -v o="$without" -v n=$((3 * BENCH_ITER)) 'BEGIN {
        if (n > 0 && o > 0) {
            printf "METRIC reset.roundtrip_with_reset_ms %.2f\n", w / n
            printf "METRIC reset.roundtrip_without_reset_ms %.2f\n", o / n
            printf "METRIC reset.added_per_release_ms %.2f\n", (w - o) / n
            printf "METRIC reset.ratio %.2f\n", w / o
        } }'
fi
echo default > /sys/bus/pci/devices/$VIRTIO/reset_method 2>/dev/null
raw_restore $VIRTIO virtio-pci
