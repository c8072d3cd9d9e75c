#!/usr/bin/env bash
# Renders the Helm chart deploy/helm/vfio-gpu-dra with its default values into
# deploy/*.yaml (rbac, admission-policy, deviceclass, daemonset, networkpolicy): the
# chart is the one source, those files are generated. deploy/kubevirt-vm.yaml is an
# example and not part of the chart.
#
#   deploy/helm/render.sh            # rewrite deploy/*.yaml
#   deploy/helm/render.sh --check    # fail (listing the diff) if they drift
#
# No helm binary: tests/k8s/helmrender renders with Helm's Go packages
# (helm.sh/helm/v3 chart loader, chartutil, engine) from the Go module proxy (or a
# warm module cache). Needs Go >= 1.26.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
check=0
[ "${1:-}" = "--check" ] && check=1

out="$REPO/deploy"
if [ "$check" = 1 ]; then
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
fi
(cd "$REPO/tests/k8s/helmrender" && go run . -chart "$REPO/deploy/helm/vfio-gpu-dra" -out "$out")
if [ "$check" = 1 ]; then
  status=0
  for f in "$out"/*.yaml; do
    name=$(basename "$f")
    if ! diff -u "$REPO/deploy/$name" "$f"; then
      echo "deploy/$name differs from the chart's default render: run deploy/helm/render.sh" >&2
      status=1
    fi
  done
  exit $status
fi
echo "rendered deploy/{$(cd "$out" && ls admission-policy.yaml daemonset.yaml deviceclass.yaml networkpolicy.yaml rbac.yaml | tr '\n' ',' | sed 's/,$//')}"
