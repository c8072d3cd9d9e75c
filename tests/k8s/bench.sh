#!/usr/bin/env bash
# Prepare/unprepare latency through the kubelet's own DRA manager
# (pkg/kubelet/cm/dra PrepareResources/UnprepareResources of a pod, with its claim
# GET and checkpoint writes) driving the real `vfio-gpu-dra serve --demo --hgx`
# process over its socket, against the real kube-apiserver (TestBenchPrepare,
# K8S_BENCH=1): claims of 1 and 8 GPUs on the HGX demo host (zero-latency simulated
# kernel and Fabric Manager), p50/p99 of the kubelet-observed time and the plugin's
# own share of it (its prepare/unprepare histogram on /metrics, read around every
# call), and the 8-GPU / 1-GPU ratio.
#
#   tests/k8s/bench.sh                          # N=100, release profile, lane 1.34
#   BENCH_N=200 BENCH_PROFILE=dev K8S_LANE=1.36 tests/k8s/bench.sh
#   BENCH_EMULATOR=1 tests/k8s/bench.sh         # also the kubelet emulator's bench
#
# BENCH_PROFILE (release | dev) is the cargo profile of the vfio-gpu-dra binary (and
# of the emulator bench). VFIO_GPU_DRA_BIN overrides the binary (its profile is then
# yours to match). CARGO_TARGET_DIR is honoured. Go code is always optimised (go test -c).
# BENCH_KERNEL_LATENCY=realistic gives the simulated kernel the engine bench's driver
# times (nvidia unbind 2 s, vfio-pci bind 0.3 s; or any `--demo-kernel-latency` spec),
# so moves wait as on a node: the parallel-move ratio, not the simulator's CPU work.
# BENCH_EMULATOR=1 adds `cargo bench -p vfio-gpu-kubelet --bench prepare` (the
# kubelet emulator over the real socket, plugin in-process, fake API server, one
# GPU of the plain demo host) with the same N, printed after the main table.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)

N=${BENCH_N:-100}
EMULATOR=${BENCH_EMULATOR:-0}
PROFILE=${BENCH_PROFILE:-release}
LANE=${K8S_LANE:-1.34}
LATENCY=${BENCH_KERNEL_LATENCY:-}
[ "$LATENCY" = realistic ] && LATENCY="unbind/nvidia=2s,bind/vfio-pci=300ms"
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
if [ "$EMULATOR" = 1 ]; then
  echo "== bench: cargo bench ${bench_profile[*]} -p vfio-gpu-kubelet --bench prepare --no-run"
  (cd "$REPO" && cargo bench "${bench_profile[@]}" -p vfio-gpu-kubelet --bench prepare --no-run)
fi

echo "== bench: go test -c (lane $LANE)"
(cd "$HERE" && go test -c -o "$OUT/bench-$LANE.test" "${lane_args[@]}" .)

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
echo "== bench: kubelet DRA manager, N=$N (load $load_before)"
(cd "$HERE" && K8S_BENCH=1 K8S_BENCH_N="$N" K8S_BENCH_KERNEL_LATENCY="$LATENCY" "$OUT/bench-$LANE.test" \
  -test.run '^TestBenchPrepare$' -test.v -test.count=1 -test.timeout=30m) 2>&1 | tee "$OUT/kubelet.log"
load_mid=$(cut -d' ' -f1-3 /proc/loadavg)
if [ "$EMULATOR" = 1 ]; then
  echo "== bench: kubelet emulator, BENCH_N=$N (load $load_mid)"
  (cd "$REPO" && BENCH_N="$N" cargo bench "${bench_profile[@]}" -p vfio-gpu-kubelet --bench prepare) 2>&1 | tee "$OUT/emulator.log"
fi
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

# "BENCH kubelet-manager prepare   gpus=8 n=100 p50=1.234 ms p99=5.678 ms max=... ms
#  plugin-p50=0.123 ms plugin-p99=0.456 ms share-p50=10.0 % share-p99=8.0 %"
kub() { # call gpus -> "p50 p99 plugin-p50 plugin-p99 share-p50 share-p99"
  sed -n "s/^BENCH kubelet-manager $1 *gpus=$2 n=[0-9]* p50=\([0-9.]*\) ms p99=\([0-9.]*\) ms max=[0-9.]* ms plugin-p50=\([0-9.]*\) ms plugin-p99=\([0-9.]*\) ms share-p50=\([0-9.]*\) % share-p99=\([0-9.]*\) %.*/\1 \2 \3 \4 \5 \6/p" "$OUT/kubelet.log"
}
p1=$(kub prepare 1); p8=$(kub prepare 8); u1=$(kub unprepare 1); u8=$(kub unprepare 8)
if [ -z "$p1" ] || [ -z "$p8" ] || [ -z "$u1" ] || [ -z "$u8" ]; then
  echo "bench: could not read the figures (logs in $OUT)" >&2
  exit 1
fi

echo
echo "== prepare/unprepare through the kubelet DRA manager, $(date -u +%Y-%m-%dT%H:%MZ), N=$N (+5 warm-up) per size, profile $PROFILE, lane $LANE, HGX demo host"
echo "   simulated kernel latencies: ${LATENCY:-none (zero-latency kernel)}"
echo "   load average: $load_before (start), $load_mid (end of kubelet bench); $(nproc) cores"
echo "| call | GPUs | pct | kubelet-observed (ms) | plugin (ms) | plugin share |"
echo "|---|---:|---|---:|---:|---:|"
row() { # call gpus figures
  echo "$3" | awk -v c="$1" -v g="$2" '{ printf "| %s | %d | p50 | %.3f | %.3f | %.1f %% |\n| %s | %d | p99 | %.3f | %.3f | %.1f %% |\n", c, g, $1, $3, $5, c, g, $2, $4, $6 }'
}
row prepare 1 "$p1"; row prepare 8 "$p8"; row unprepare 1 "$u1"; row unprepare 8 "$u8"
echo
echo "8 GPUs / 1 GPU (kubelet-observed; plugin):"
ratio() { # call one eight
  echo "$2 $3" | awk -v c="$1" '{ printf "  %-9s p50 %.2f; %.2f   p99 %.2f; %.2f\n", c, $7/$1, $9/$3, $8/$2, $10/$4 }'
}
ratio prepare "$p1" "$p8"; ratio unprepare "$u1" "$u8"

if [ "$EMULATOR" = 1 ]; then
  # "prepare (moves the GPU)      n=200  p50=   1.234 ms  p99=   5.678 ms  max=..."
  emu() { sed -n "s/^$1 *n=[0-9]* *p50= *\([0-9.]*\) ms *p99= *\([0-9.]*\) ms.*/\1 \2/p" "$OUT/emulator.log"; }
  echo
  echo "kubelet emulator (plain demo host, 1 GPU; load at end $load_after):"
  echo "  prepare   p50/p99 ms: $(emu 'prepare (moves the GPU)')"
  echo "  unprepare p50/p99 ms: $(emu 'unprepare (restores)')"
fi
echo "(logs in $OUT)"
