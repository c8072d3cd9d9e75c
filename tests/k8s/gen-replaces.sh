#!/usr/bin/env bash
# Pins one Kubernetes version in a lane's go.mod file: requires k8s.io/kubernetes at that
# version and maps every staging module (which k8s.io/kubernetes requires at v0.0.0 and
# replaces with ./staging/src/... — replaces of a dependency are ignored) to its published
# tag v0.<minor>.<patch>. The list is read from the pinned version's own go.mod, never
# hand-copied, so a new minor with new staging modules needs nothing but a re-run.
#
#   tests/k8s/gen-replaces.sh 1.34.4 go.mod
#   tests/k8s/gen-replaces.sh 1.36.3 lane-1.36.mod k8s136
#   tests/k8s/gen-replaces.sh 1.37.2 lane-1.37.mod k8s137
#
# The third argument is the lane's build tag. `go mod tidy` looks at every build tag at
# once, so it sees the other lanes' version files too (importing packages this version
# lacks): it runs with -e and the lane is then checked to resolve with its own tag.
#
# Uses only the go command and the Go module proxy. Commit the .mod and .sum it writes.
set -euo pipefail
cd "$(dirname "$0")"
V=${1:?usage: gen-replaces.sh <k8s version, e.g. 1.34.4> [modfile]}
V=${V#v}
MODFILE=${2:-go.mod}
TAGS=${3:-}
STAGING_TAG=v0.${V#1.}
# -modfile for lanes other than go.mod (go.mod must exist; the lane's .sum sits next to its .mod).
MF=()
[ "$MODFILE" = go.mod ] || MF=(-modfile="$MODFILE")
if [ ! -f "$MODFILE" ]; then
  printf 'module %s\n\ngo 1.24.0\n' "$(go mod edit -json | sed -n 's/^[[:space:]]*"Path": "\(.*\)"$/\1/p' | head -1)" > "$MODFILE"
fi

K8S_GOMOD=$(go mod download -json "k8s.io/kubernetes@v$V" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",*$/\1/p')
[ -f "$K8S_GOMOD" ] || { echo "cannot download k8s.io/kubernetes@v$V" >&2; exit 1; }

# Drop replaces a previous run wrote (any k8s.io/* => k8s.io/* at a tag).
for old in $(go mod edit "${MF[@]}" -json | sed -n 's/^[[:space:]]*"Path": "\(k8s.io\/[^"]*\)",*$/\1/p' | sort -u); do
  go mod edit "${MF[@]}" -dropreplace="$old" 2>/dev/null || true
done
n=0
for m in $(sed -n 's#^[[:space:]]*\(k8s.io/[A-Za-z0-9._-]*\) => ./staging/src/.*#\1#p' "$K8S_GOMOD"); do
  go mod edit "${MF[@]}" -replace="$m=$m@$STAGING_TAG"
  n=$((n+1))
done
[ "$n" -gt 0 ] || { echo "no staging replaces found in $K8S_GOMOD" >&2; exit 1; }
# The godebug default of the pinned version (a dependency's godebug lines are ignored).
gd=$(sed -n 's/^godebug default=\(go[0-9.]*\)$/\1/p' "$K8S_GOMOD" | head -1)
[ -z "$gd" ] || go mod edit "${MF[@]}" -godebug="default=$gd"
go mod edit "${MF[@]}" -require="k8s.io/kubernetes@v$V"
tidy_log=$(mktemp)
go mod tidy -e "${MF[@]}" 2> "$tidy_log" || true
# Every package of the lane must resolve with its tag (tidy -e would not say).
if ! go list "${MF[@]}" -tags "$TAGS" -test -deps . > /dev/null; then
  cat "$tidy_log" >&2; rm -f "$tidy_log"; exit 1
fi
rm -f "$tidy_log"
echo "$MODFILE: k8s.io/kubernetes v$V, $n staging modules at $STAGING_TAG${gd:+, godebug default=$gd}"
