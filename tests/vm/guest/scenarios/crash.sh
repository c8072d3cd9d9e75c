# Crash sweep: for N = 1, 2, ... run bind (then release) with
# VFIO_GPU_DRA_CRASH_AFTER_STEP=N, so the process aborts right after its N-th host
# mutation; then reconcile and check the invariants on real sysfs. A sweep stops
# at the first N where the command completes without crashing.
#
#   after an interrupted bind + reconcile: every function back on its original
#     driver (or unbound if it had none), driver_override "(null)" -- an
#     uncommitted bind is rolled back; or, if the crash came after the commit
#     point, all functions on vfio-pci with the ledger saying "configured", and a
#     plain release then restores the original drivers;
#   after an interrupted release + reconcile: the release is finished (all
#     functions on their original drivers, override cleared; "consistent" is
#     checked separately so a mixed group is reported as such), and a further
#     plain release is a no-op that leaves it so. The sweep crosses the release's
#     hand-over (reset, then verify): at least one crash must land in it, seen
#     in the ledger right after the crash.
MAXSTEP=${CRASH_MAXSTEP:-40}

# crash_sweep OP NAME GPUID BDF "bdf:orig ..."
crash_sweep() {
    _op=$1 _nm=$2 _id=$3 _bdf=$4 _fns=$5
    _S=crash-$_op.$_nm
    GPU_IDS="--gpu-id $_id"
    restore_all "$_fns"
    _n=1 _points=0 _done=no _in_reset=0 _in_verify=0
    while [ $_n -le $MAXSTEP ]; do
        new_state "crash-$_op-$_nm-$_n"
        if [ "$_op" = release ]; then
            cli "$_S.$_n.setup-bind" bind "$_bdf"
            if [ "$RC" != 0 ] || ! all_vfio "$_fns"; then
                fail "$_S.$_n.setup-bind" "bind before the release crash failed: rc=$RC ${DETAIL}"
                restore_all "$_fns"; break
            fi
        fi
        CLI_ENV="VFIO_GPU_DRA_CRASH_AFTER_STEP=$_n"
        cli "$_S.$_n.run" "$_op" "$_bdf"
        CLI_ENV=
        _rc=$RC
        if [ "$_rc" = 0 ]; then
            _done=yes
            if [ "$_op" = bind ]; then
                check "$_S.completes-at-$_n" all_vfio "$_fns"
                cli "$_S.$_n.cleanup-release" release "$_bdf"
            fi
            check "$_S.clean-after-completion" all_original "$_fns"
            restore_all "$_fns"
            break
        fi
        if ! crashed "$_rc"; then
            fail "$_S.$_n.run" "exit status $_rc: an error, not an injected crash (see block $_S.$_n.run)"
            restore_all "$_fns"; _n=$((_n + 1)); continue
        fi
        _points=$((_n))
        if [ "$_op" = release ]; then
            # Where the crash landed: the hand-over's steps (reset, verify) are
            # crash points like the moves, and reconcile must finish them too.
            cli "$_S.$_n.ledger-at-crash" ledger --output json
            if grep -q '"phase": *"resetting"' "$OUT/$_S.$_n.ledger-at-crash.out"; then
                _in_reset=$((_in_reset + 1))
            elif grep -q '"phase": *"verifying"' "$OUT/$_S.$_n.ledger-at-crash.out"; then
                _in_verify=$((_in_verify + 1))
            fi
        fi
        cli "$_S.$_n.reconcile" reconcile --output json
        check "$_S.$_n.reconcile-rc" is_rc "$RC" 0 "$_S.$_n.reconcile"
        if [ "$_op" = bind ]; then
            # Rolled back, unless the crash came after the bind was committed:
            # then the ledger must say so (state configured, held by the admin's
            # bind) and a plain release must restore the original drivers.
            cli "$_S.$_n.ledger-after-reconcile" ledger --output json
            if all_vfio "$_fns" && grep -q '"state": *"configured"' "$OUT/$_S.$_n.ledger-after-reconcile.out"; then
                echo "NOTE $_S.$_n: crash after the commit point; reconcile kept the bind"
                pass "$_S.$_n.committed-bind-recorded"
                cli "$_S.$_n.release-after" release "$_bdf"
                check "$_S.$_n.release-after-rc" is_rc "$RC" 0 "$_S.$_n.release-after"
                check "$_S.$_n.release-after-original" all_original "$_fns"
            else
                check "$_S.$_n.rolled-back" all_original "$_fns"
            fi
        else
            check "$_S.$_n.consistent" consistent "$_fns"
            # the release was asked for and recorded: reconcile finishes it
            check "$_S.$_n.finished" all_original "$_fns"
        fi
        cli "$_S.$_n.reconcile2" reconcile --output json
        check "$_S.$_n.reconcile-idempotent" is_rc "$RC" 0 "$_S.$_n.reconcile2"
        if [ "$_op" = release ]; then
            cli "$_S.$_n.release-after" release "$_bdf"
            check "$_S.$_n.release-after-rc" is_rc "$RC" 0 "$_S.$_n.release-after"
            check "$_S.$_n.release-after-original" all_original "$_fns"
        fi
        cli "$_S.$_n.ledger" ledger --output json
        restore_all "$_fns"
        _n=$((_n + 1))
    done
    DETAIL="no run completed within $MAXSTEP steps"
    check "$_S.sweep-terminates" test $_done = yes
    DETAIL="no crash was injected (is VFIO_GPU_DRA_CRASH_AFTER_STEP implemented?)"
    check "$_S.crash-points" test $_points -ge 1
    echo "METRIC crash-$_op.$_nm.points $_points"
    if [ "$_op" = release ]; then
        echo "METRIC crash-$_op.$_nm.in-handover $_in_reset resetting, $_in_verify verifying"
        # Devices handed over unsanitized by the guest's policy (no reset
        # method, tests/vm/guest/init) record the hand-over too.
        DETAIL="no crash landed in the hand-over (reset and verify) of the release"
        check "$_S.crashes-in-handover" test $((_in_reset + _in_verify)) -ge 1
    fi
}

if ! cli_ready; then skip crash "awaits the CLI"; else
    for _op in bind release; do
        crash_sweep $_op virtio 1af4:1041 $VIRTIO "$VIRTIO:virtio-pci"
        crash_sweep $_op two-function 8086:100e $E1000 "$E1000:e1000 $TESTDEV:none"
        crash_sweep $_op edu 1234:11e8 $EDU "$EDU:none"
    done
    CLI_ENV=
fi
[ "$PREBOUND" = yes ] && check crash.prebound-untouched is_drv $E1000E vfio-pci
