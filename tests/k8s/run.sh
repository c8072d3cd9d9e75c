#!/usr/bin/env bash
# The real-Kubernetes conformance suite, every lane: etcd, kube-apiserver, the
# allocator and the kubelet's DRA code from the pinned Kubernetes release, in one Go
# test process per lane, driving the real `vfio-gpu-dra serve --demo` binary.
#
#   tests/k8s/run.sh                 # all lanes; builds the Rust binary if needed
#   K8S_LANES=1.36 tests/k8s/run.sh  # one lane
#   VFIO_GPU_DRA_BIN=path/to/vfio-gpu-dra tests/k8s/run.sh
#   K8S_RUN='TestK8s/Register' tests/k8s/run.sh   # a subset (go test -run)
#   K8S_CLEAN_GO_CACHE=1 tests/k8s/run.sh      # drop the Go build cache after each lane (CI: disk)
#
# Needs: Go >= 1.26 and the Go module proxy (or a warm module cache), cargo when
# VFIO_GPU_DRA_BIN is not given. Go caches stay where `go env` puts them (outside the
# clone). Last line: "k8s: N passed, M failed"; exit status non-zero on any failure.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
cd "$HERE"

LANES=${K8S_LANES:-"1.34 1.36 1.37"}
OUT=${K8S_OUT:-$(mktemp -d /tmp/k8s-suite.XXXXXX)}
mkdir -p "$OUT"
LANE_TIMEOUT=${K8S_LANE_TIMEOUT:-25m}

lane_args() { # lane -> go flags selecting its go.mod and version file
  case "$1" in
    1.34) echo "" ;;
    1.36) echo "-modfile=lane-1.36.mod -tags=k8s136" ;;
    1.37) echo "-modfile=lane-1.37.mod -tags=k8s137" ;;
    *) echo "unknown lane $1" >&2; return 1 ;;
  esac
}

passed=0
failed=0
status=0

if [ -z "${VFIO_GPU_DRA_BIN:-}" ]; then
  echo "== k8s: building vfio-gpu-dra (cargo build -p vfio-gpu-dra)"
  if ! (cd "$REPO" && cargo build -p vfio-gpu-dra); then
    echo "k8s: 0 passed, 1 failed"
    exit 1
  fi
  target=${CARGO_TARGET_DIR:-target}
  case "$target" in /*) ;; *) target="$REPO/$target" ;; esac
  VFIO_GPU_DRA_BIN="$target/debug/vfio-gpu-dra"
fi
VFIO_GPU_DRA_BIN=$(cd "$(dirname "$VFIO_GPU_DRA_BIN")" && pwd)/$(basename "$VFIO_GPU_DRA_BIN")
export VFIO_GPU_DRA_BIN
echo "== k8s: binary $VFIO_GPU_DRA_BIN"

# The Helm chart's value sets for TestK8s/HelmChart (helm_test.go), rendered with
# Helm's Go packages in their own module (helmrender/), not the lanes' go.mod files.
if [ -z "${K8S_HELM_RENDERED:-}" ]; then
  K8S_HELM_RENDERED="$OUT/helm"
  rm -rf "$K8S_HELM_RENDERED"
  render_set() { # name -set... : one value set into $K8S_HELM_RENDERED/<name>
    local name=$1; shift
    mkdir -p "$K8S_HELM_RENDERED/$name"
    (cd "$HERE/helmrender" && go run . -chart "$REPO/deploy/helm/vfio-gpu-dra" -out "$K8S_HELM_RENDERED/$name" "$@")
  }
  echo "== k8s: rendering the Helm chart (tests/k8s/helmrender)"
  t0=$(date +%s)
  if ! { render_set defaults &&
    render_set k0s-nfd-digest --set kubeletRootDir=/var/lib/k0s/kubelet --set namespace.name=gpu-system \
      --set nodeTargeting.mode=nfd --set image.digest=sha256:$(printf 'ab%.0s' $(seq 32)) \
      --set logLevel=debug --set 'imagePullSecrets=[{name: regcred}]' &&
    render_set minimal --set metrics.enabled=false --set networkPolicy.enabled=false \
      --set admissionPolicy.enabled=false --set namespace.create=false; }; then
    echo "k8s: rendering the Helm chart failed"; echo "k8s: 0 passed, 1 failed"; exit 1
  fi
  echo "== k8s: chart rendered ($(( $(date +%s) - t0 ))s)"
fi
export K8S_HELM_RENDERED

for lane in $LANES; do
  args=$(lane_args "$lane") || { failed=$((failed+1)); status=1; continue; }
  bin="$OUT/lane-$lane.test"
  echo "== k8s lane $lane: go mod download"
  t0=$(date +%s)
  # shellcheck disable=SC2086
  if ! go mod download $(echo "$args" | tr ' ' '\n' | grep modfile) ; then
    echo "k8s lane $lane: module download failed"; failed=$((failed+1)); status=1; continue
  fi
  t1=$(date +%s)
  echo "== k8s lane $lane: go test -c ($((t1-t0))s download)"
  # shellcheck disable=SC2086
  if ! go test -c -o "$bin" $args . ; then
    echo "k8s lane $lane: build failed"; failed=$((failed+1)); status=1; continue
  fi
  t2=$(date +%s)
  echo "== k8s lane $lane: run ($((t2-t1))s build)"
  log="$OUT/lane-$lane.log"
  # -test.v output converted by test2json: the same events go test -json reports.
  timeout --kill-after=30s "$LANE_TIMEOUT" "$bin" -test.v -test.count=1 -test.timeout="$LANE_TIMEOUT" \
    ${K8S_RUN:+-test.run="$K8S_RUN"} 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  go tool test2json -p "k8s/$lane" < "$log" > "$OUT/lane-$lane.json"
  # Count leaf tests only: a group (TestK8s, TestK8s/Publish, ...) fails whenever one
  # of its subtests does and would count each failure several times.
  counts=$(sed -n 's/.*"Action":"\(pass\|fail\)".*"Test":"\([^"]*\)".*/\1 \2/p' "$OUT/lane-$lane.json" |
    awk '{ act[$2] = $1; n[NR] = $2 }
         END { for (i in n) { t = n[i]; for (j in n) if (index(n[j], t "/") == 1) { parent[t] = 1; break } }
               for (t in act) if (!(t in parent)) c[act[t]]++
               printf "%d %d\n", c["pass"], c["fail"] }')
  counts=${counts:-0 0}
  p=${counts% *}
  f=${counts#* }
  t3=$(date +%s)
  # A crash, timeout or build problem with no failed test still fails the lane.
  if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then f=1; fi
  [ "$rc" -eq 0 ] || status=1
  echo "k8s lane $lane: $p passed, $f failed (download $((t1-t0))s, build $((t2-t1))s, run $((t3-t2))s; log $log)"
  grep -E '^\s*--- FAIL' "$log" | sed "s/^/k8s lane $lane: /" || true
  passed=$((passed+p))
  failed=$((failed+f))
  # CI (K8S_CLEAN_GO_CACHE=1): each lane compiles its own Kubernetes release, gigabytes
  # of build cache the next lane cannot reuse; dropping it keeps the disk's peak to one lane.
  if [ "${K8S_CLEAN_GO_CACHE:-0}" = 1 ]; then go clean -cache || true; fi
done

[ "$failed" -eq 0 ] || status=1
echo "k8s: $passed passed, $failed failed"
exit $status
