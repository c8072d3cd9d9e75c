#!/usr/bin/env bash
# Measures the resident memory of an idle `vfio-gpu-dra serve` with metrics on:
# serve --demo (the built-in 8-GPU demo host, simulated kernel) against the fake
# API server (crates/fake-apiserver, example `standalone`), registered through the
# kubelet emulator (crates/kubelet, example `register`), /readyz 200. Then it idles
# for IDLE seconds (default 65: past one periodic health scan at 30 s and one
# reconcile at 60 s), prints VmRSS and VmHWM from /proc/PID/status with the split
# between anonymous memory and mapped files (the binary's and glibc's pages), and
# fails when VmRSS is over the limit: RSS_MAX_BYTES, default 15000000 (15 MB).
#
# SERVE_ARGS adds arguments to serve (e.g. "--worker-threads 0" for tokio's one per CPU).
#
# Usage: deploy/image/idle-rss.sh [BIN]   (default <target>/dist/vfio-gpu-dra, the shipped
#        binary: deploy/image/build-bin.sh amd64;
#        <target> is $CARGO_TARGET_DIR, else target/)
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
case "$TARGET" in /*) ;; *) TARGET=$ROOT/$TARGET ;; esac
BIN=${1:-$TARGET/dist/vfio-gpu-dra}
IDLE=${IDLE:-65}
RSS_MAX_BYTES=${RSS_MAX_BYTES:-15000000}
[ -x "$BIN" ] || { echo "idle-rss.sh: $BIN is not an executable" >&2; exit 1; }

(cd "$ROOT" && cargo build -q -p fake-apiserver --example standalone &&
    cargo build -q -p vfio-gpu-kubelet --example register)
EX=$TARGET/debug/examples

T=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2> /dev/null || true; done
    wait 2> /dev/null || true
    rm -rf "$T"
}
trap cleanup EXIT

"$EX/standalone" "$T/kubeconfig" demo-node > "$T/api.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do [ -s "$T/kubeconfig" ] && break; sleep 0.1; done
[ -s "$T/kubeconfig" ] || { cat "$T/api.log" >&2; exit 1; }

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$BIN" serve --demo --demo-dir "$T/demo" --node-name demo-node --kubeconfig "$T/kubeconfig" \
    --kubelet-plugins-dir "$T/plugins" --kubelet-registrar-dir "$T/registry" \
    --cdi-root "$T/cdi" --metrics-addr "127.0.0.1:$PORT" ${SERVE_ARGS:-} > "$T/serve.log" 2>&1 &
PID=$!
PIDS+=("$PID")
"$EX/register" "$T/registry/vfio-gpu.dra.dev-reg.sock"

status() {
    python3 - "$PORT" "$1" <<'PY'
import sys, urllib.request, urllib.error
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}{sys.argv[2]}", timeout=5) as r:
        print(r.status)
except urllib.error.HTTPError as e:
    print(e.code)
except OSError:
    print(0)
PY
}
for _ in $(seq 150); do [ "$(status /readyz)" = 200 ] && break; sleep 0.2; done
[ "$(status /readyz)" = 200 ] || { echo "idle-rss.sh: /readyz never 200" >&2; cat "$T/serve.log" >&2; exit 1; }
status /metrics > /dev/null
rss() { awk -v k="$1:" '$1 == k { print $2 }' "/proc/$PID/status"; }
echo "ready: VmRSS $(rss VmRSS) kB"
sleep "$IDLE"
kill -0 "$PID" || { echo "idle-rss.sh: serve exited" >&2; cat "$T/serve.log" >&2; exit 1; }
[ "$(status /healthz)" = 200 ] || { echo "idle-rss.sh: /healthz not 200" >&2; exit 1; }
RSS_KB=$(rss VmRSS)
echo "idle ${IDLE} s: VmRSS $RSS_KB kB (anonymous $(rss RssAnon) kB, files $(rss RssFile) kB), VmHWM $(rss VmHWM) kB, threads $(rss Threads) ($BIN, $(stat -c %s "$BIN") bytes)"
if [ $((RSS_KB * 1024)) -gt "$RSS_MAX_BYTES" ]; then
    echo "idle-rss.sh: FAIL VmRSS $((RSS_KB * 1024)) bytes is over the limit $RSS_MAX_BYTES" >&2
    exit 1
fi
echo "idle-rss.sh: PASS VmRSS $((RSS_KB * 1024)) bytes <= $RSS_MAX_BYTES"
