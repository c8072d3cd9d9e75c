# The plugin killed mid-operation, then restarted: for N = 1, 2, ... the in-process
# plugin of `demo` runs with VFIO_GPU_DRA_CRASH_AFTER_STEP=N and aborts right after
# its N-th host mutation (in the kubelet's prepare, later in its unprepare); then a
# real `vfio-gpu-dra serve` starts on the same state and kubelet directories (its
# startup reconcile runs before its sockets appear) and is stopped with SIGTERM.
# Then the IOMMU group must be consistent: all functions back on their original
# drivers with driver_override cleared, or all on vfio-pci with the ledger saying
# "configured" (a prepare past its commit point: the claim still holds it); a crash
# in the unprepare must end with the release finished. A second reconcile must
# change nothing (sysfs, ledger file, every action a no-op).
S=plugin-crash
D=/tmp/pc     # short: Unix socket paths are limited to 108 bytes
FNS="$VIRTIO:virtio-pci"
MAX=${PLUGIN_CRASH_MAXSTEP:-30}

snapshot() {  # sysfs of the group's functions + the ledger file
    for _p in $FNS; do printf '%s=%s/%s ' "${_p%:*}" "$(drv "${_p%:*}")" "$(ovr "${_p%:*}")"; done
    md5sum < "$D/state/ledger.json" 2>/dev/null || echo no-ledger
}

# restart_serve NAME: run `serve` on $D until its registration socket exists, then
# SIGTERM it; sets SERVED (yes/no) and RC (serve's exit status)
restart_serve() {
    _sock=$D/plugins_registry/vfio-gpu.dra.dev-reg.sock
    rm -f "$_sock"
    VFIO_GPU_DRA_LOG=info $BIN serve --node-name demo-node --host-root / --gpu-id 1af4:1041 \
        --state-dir "$D/state" --kubeconfig "$D/kubeconfig" --cdi-root "$D/cdi" \
        --kubelet-plugins-dir "$D/plugins" --kubelet-registrar-dir "$D/plugins_registry" \
        > "$OUT/$1.out" 2> "$OUT/$1.err" &
    _pid=$!
    SERVED=no
    _i=0
    while [ $_i -lt 600 ]; do   # 60 s
        [ -S "$_sock" ] && { SERVED=yes; break; }
        kill -0 $_pid 2>/dev/null || break
        sleep 0.1 2>/dev/null || sleep 1
        _i=$((_i + 1))
    done
    kill -TERM $_pid 2>/dev/null
    wait $_pid
    RC=$?
    echo "=== BEGIN $1 rc=$RC json=0 ==="
    awk 1 "$OUT/$1.out"
    echo "=== STDERR ==="
    awk 1 "$OUT/$1.err"
    echo "=== END ==="
}

if ! cli_ready; then skip "$S" "awaits the CLI"; else
    ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
    GPU_IDS="--gpu-id 1af4:1041"
    restore_all "$FNS"
    n=1 points=0 in_prepare=0 in_unprepare=0 done=no
    while [ $n -le $MAX ]; do
        T=$S.$n
        rm -rf $D
        emit "$T.demo" env VFIO_GPU_DRA_CRASH_AFTER_STEP=$n $BIN demo --dir $D --host-root / \
            --gpu-id 1af4:1041 --claim $VIRTIO
        rc=$RC
        if [ "$rc" = 0 ]; then
            done=yes
            check "$S.clean-after-completion" all_original "$FNS"
            break
        fi
        if ! crashed "$rc"; then
            fail "$T.demo" "exit status $rc: an error, not an injected crash (see block $T.demo)"
            restore_all "$FNS"; n=$((n + 1)); continue
        fi
        if grep -q "kubelet: NodeUnprepareResources" "$OUT/$T.demo.out"; then
            phase=unprepare; in_unprepare=$((in_unprepare + 1))
        elif grep -q "kubelet: NodePrepareResources" "$OUT/$T.demo.out"; then
            phase=prepare; in_prepare=$((in_prepare + 1))
        else
            phase=start
        fi
        points=$n
        echo "NOTE $T: crashed in $phase: $(drv $VIRTIO)/$(ovr $VIRTIO)"
        STATE=$D/state
        restart_serve "$T.serve"
        DETAIL="no registration socket within 60 s, or serve died (see block $T.serve)"
        check "$T.restart-served" test $SERVED = yes
        check "$T.restart-stopped" is_rc "$RC" 0 "$T.serve"
        check "$T.consistent" consistent "$FNS"
        cli "$T.ledger" ledger --output json
        if [ "$phase" = unprepare ]; then
            # the kubelet asked for the release and the ledger recorded it
            check "$T.release-finished" all_original "$FNS"
        elif all_vfio "$FNS"; then
            DETAIL="on vfio-pci after the restart, but the ledger does not say configured (see block $T.ledger)"
            check "$T.vfio-recorded-configured" grep -q '"state": *"configured"' "$OUT/$T.ledger.out"
        else
            check "$T.rolled-back" all_original "$FNS"
        fi
        before=$(snapshot)
        cli "$T.reconcile2" reconcile --output json
        after=$(snapshot)
        check "$T.reconcile2-rc" is_rc "$RC" 0 "$T.reconcile2"
        DETAIL="before [$before] after [$after]"
        check "$T.reconcile2-changes-nothing" test "$before" = "$after"
        DETAIL="actions: $(grep '"action"' "$OUT/$T.reconcile2.out" | tr -s ' ' | tr '\n' ' ')"
        check "$T.reconcile2-no-op" sh -c "! grep '\"action\"' '$OUT/$T.reconcile2.out' | grep -vqE 'nothing-to-do|noted'"
        if all_vfio "$FNS"; then
            # the claim still holds it; the admin takes it back
            cli "$T.release-force" release --force $VIRTIO
        fi
        restore_all "$FNS"
        n=$((n + 1))
    done
    DETAIL="the demo never completed within $MAX crash points"
    check "$S.sweep-terminates" test $done = yes
    DETAIL="no crash landed in the prepare ($in_prepare) or in the unprepare ($in_unprepare): is VFIO_GPU_DRA_CRASH_AFTER_STEP wired into demo?"
    check "$S.crashed-in-prepare-and-unprepare" test $in_prepare -ge 1 -a $in_unprepare -ge 1
    echo "METRIC $S.points $points prepare=$in_prepare unprepare=$in_unprepare"
    GPU_IDS=
fi
restore_all "$FNS"
