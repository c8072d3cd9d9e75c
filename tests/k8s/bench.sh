#!/usr/bin/env bash
# Prepare/unprepare latency, p50/p99, in one run:
#   1. the kubelet's own DRA manager (pkg/kubelet/cm/dra PrepareResources/UnprepareResources
#      of a pod, with its claim GET and checkpoint writes) driving the real
#      `vfio-gpu-dra serve --demo` process over its socket, against the real
#      kube-apiserver (TestBenchPrepare, K8S_BENCH=1);
#   2. the kubelet emulator's bench (cargo bench -p vfio-gpu-kubelet --bench prepare:
#      NodePrepareResources/NodeUnprepareResources over the real socket, plugin
#      in-process, fake API server);
# then a side-by-side table. Both use the demo host's zero-latency simulated kernel.
#
#   tests/k8s/bench.sh                          # N=50, release profile, lane 1.34
#   BENCH_N=200 BENCH_PROFILE=dev K8S_LANE=1.36 tests/k8s/bench.sh
#
# BENCH_PROFILE (release | dev) is used for both the vfio-gpu-dra binary and the
# emulator bench. VFIO_GPU_DRA_BIN overrides the binary (its profile is then yours
# to match). CARGO_TARGET_DIR is honoured. Go code is always optimised (go test -c).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)

N=${BENCH_N:-50}
PROFILE=${BENCH_PROFILE:-release}
LANE=${K8S_LANE:-1.34}
OUT=${K8S_OUT:-$(mktemp -d /tmp/k8s-bench.XXXXXX)}
mkdir -p "$OUT"

case "$PROFILE" in
  release) cargo_profile=(--release); bench_profile=(); profdir=release ;;
  dev) cargo_profile=(); bench_profile=(--profile dev); profdir=debug ;;
  *) echo "BENCH_PROFILE must be release or dev" >&2; exit 2 ;;
esac
case "$LANE" in
  1.34) lane_args=() ;;
  1.36) lane_args=(-modfile=lane-1.36.mod -tags=k8s136) ;;
  1.37) lane_args=(-modfile=lane-1.37.mod -tags=k8s137) ;;
  *) echo "unknown lane $LANE" >&2; exit 2 ;;
esac

target=${CARGO_TARGET_DIR:-target}
case "$target" in /*) ;; *) target="$REPO/$target" ;; esac
if [ -z "${VFIO_GPU_DRA_BIN:-}" ]; then
  echo "== bench: cargo build ${cargo_profile[*]} -p vfio-gpu-dra"
  (cd "$REPO" && cargo build "${cargo_profile[@]}" -p vfio-gpu-dra)
  VFIO_GPU_DRA_BIN="$target/$profdir/vfio-gpu-dra"
fi
VFIO_GPU_DRA_BIN=$(cd "$(dirname "$VFIO_GPU_DRA_BIN")" && pwd)/$(basename "$VFIO_GPU_DRA_BIN")
export VFIO_GPU_DRA_BIN
echo "== bench: plugin binary $VFIO_GPU_DRA_BIN"
echo "== bench: cargo bench ${bench_profile[*]} -p vfio-gpu-kubelet --bench prepare --no-run"
(cd "$REPO" && cargo bench "${bench_profile[@]}" -p vfio-gpu-kubelet --bench prepare --no-run)

echo "== bench: go test -c (lane $LANE)"
(cd "$HERE" && go test -c -o "$OUT/bench-$LANE.test" "${lane_args[@]}" .)

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
echo "== bench: kubelet DRA manager, N=$N (load $load_before)"
(cd "$HERE" && K8S_BENCH=1 K8S_BENCH_N="$N" "$OUT/bench-$LANE.test" \
  -test.run '^TestBenchPrepare$' -test.v -test.count=1 -test.timeout=30m) 2>&1 | tee "$OUT/kubelet.log"
load_mid=$(cut -d' ' -f1-3 /proc/loadavg)
echo "== bench: kubelet emulator, BENCH_N=$N (load $load_mid)"
(cd "$REPO" && BENCH_N="$N" cargo bench "${bench_profile[@]}" -p vfio-gpu-kubelet --bench prepare) 2>&1 | tee "$OUT/emulator.log"
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

# "BENCH kubelet-manager prepare n=50 p50=1.234 ms p99=5.678 ms max=..."
kub() { sed -n "s/^BENCH kubelet-manager $1 *n=[0-9]* p50=\([0-9.]*\) ms p99=\([0-9.]*\) ms.*/\1 \2/p" "$OUT/kubelet.log"; }
# "prepare (moves the GPU)      n=200  p50=   1.234 ms  p99=   5.678 ms  max=..."
emu() { sed -n "s/^$1 *n=[0-9]* *p50= *\([0-9.]*\) ms *p99= *\([0-9.]*\) ms.*/\1 \2/p" "$OUT/emulator.log"; }
kp=$(kub prepare); ku=$(kub unprepare)
ep=$(emu 'prepare (moves the GPU)'); eu=$(emu 'unprepare (restores)')
if [ -z "$kp" ] || [ -z "$ku" ] || [ -z "$ep" ] || [ -z "$eu" ]; then
  echo "bench: could not read the figures (logs in $OUT)" >&2
  exit 1
fi

echo
echo "== prepare/unprepare latency, $(date -u +%Y-%m-%dT%H:%MZ), N=$N (+5 warm-up each), profile $PROFILE (plugin binary and emulator bench), lane $LANE"
echo "   load average: $load_before (kubelet start), $load_mid (emulator start), $load_after (end); $(nproc) cores"
{
  echo "$kp $ep" | awk '{ printf "| prepare   | p50 | %9.3f | %9.3f | %6.2f |\n| prepare   | p99 | %9.3f | %9.3f | %6.2f |\n", $1, $3, $1/$3, $2, $4, $2/$4 }'
  echo "$ku $eu" | awk '{ printf "| unprepare | p50 | %9.3f | %9.3f | %6.2f |\n| unprepare | p99 | %9.3f | %9.3f | %6.2f |\n", $1, $3, $1/$3, $2, $4, $2/$4 }'
} > "$OUT/rows"
echo "| call      |     | kubelet manager (ms) | emulator (ms) | ratio |"
echo "|---|---|---:|---:|---:|"
cat "$OUT/rows"
echo "(logs in $OUT)"
