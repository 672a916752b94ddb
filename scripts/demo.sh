#!/usr/bin/env bash
# The demo: run the storage document's VirtualMachine (demo/my-vm.yaml) with virt-launcher,
# watch the guest find its PVC disk my-vm-disk as /dev/vda and write to it, take its address on
# the pod network (standalone: passt) and answer on a port published on the host, stop it with
# SIGTERM, and show the data in the PVC's disk.img. Called by `./devtool demo`.
set -euo pipefail

LAUNCHER=${1:?usage: demo.sh <virt-launcher binary>}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GUEST_DIR=${GUEST_DIR:-$ROOT/.cache/guest}
WORK=$ROOT/.cache/demo
PVCS=$WORK/pvcs
RUNTIME=$WORK/runtime
LOG=$WORK/launcher.log
MARKER=hello-from-my-vm

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

say "PVC my-vm-disk (Filesystem mode), laid out as in a KubeVirt pod: $PVCS/my-vm-disk/disk.img"
mkdir -p "$PVCS/my-vm-disk"
rm -f "$PVCS/my-vm-disk/disk.img"
truncate -s 64M "$PVCS/my-vm-disk/disk.img"
ls -ls "$PVCS/my-vm-disk/disk.img"

# A free TCP port on the host for the guest's 8080.
PORT=18080
while [ -n "$(ss -Htln "sport = :$PORT")" ]; do PORT=$((PORT + 1)); done

say "virt-launcher run --vmi demo/my-vm.yaml --domain-type qemu --publish $PORT:8080 (TCG: this machine's KVM is nested)"
rm -rf "$RUNTIME"
"$LAUNCHER" run --vmi "$ROOT/demo/my-vm.yaml" --domain-type qemu --json-logs \
    --publish "$PORT:8080" \
    --runtime-dir "$RUNTIME" --volumes-dir "$PVCS" --kernel-boot-dir "$GUEST_DIR" \
    >"$LOG" 2>&1 &
PID=$!
trap 'kill -TERM $PID 2>/dev/null || true' EXIT

# Show the launcher's log as it comes (the guest console is relayed as subcomponent=console).
tail -n +1 -f "$LOG" --pid "$PID" &
TAIL=$!

deadline=$((SECONDS + 120))
until grep -q "LV-WROTE vda $MARKER" "$LOG" && grep -q "LV-SERVING 8080" "$LOG"; do
    if ! kill -0 "$PID" 2>/dev/null; then
        kill "$TAIL" 2>/dev/null || true
        echo "demo: the launcher exited early; see $LOG" >&2
        exit 1
    fi
    if [ $SECONDS -gt $deadline ]; then
        kill "$TAIL" 2>/dev/null || true
        echo "demo: the guest did not write to its disk and serve on 8080 within 120 s; see $LOG" >&2
        exit 1
    fi
    sleep 0.5
done
sleep 1

say "the guest saw my-vm-disk as /dev/vda and wrote to it; the launcher's view (launcherctl status):"
"$(dirname "$LAUNCHER")/launcherctl" --socket "$RUNTIME/launcher-sock" status

say "the guest's network: $(grep -o 'LV-NET [^"]*' "$LOG" | head -n 1)"
say "a connection to the published port 127.0.0.1:$PORT reaches the guest's port 8080:"
REPLY_LINE=
for _ in $(seq 30); do
    if exec 3<>"/dev/tcp/127.0.0.1/$PORT" 2>/dev/null; then
        IFS= read -r -t 10 REPLY_LINE <&3 || true
        exec 3<&-
        [ -n "$REPLY_LINE" ] && break
    fi
    sleep 1
done
echo "$REPLY_LINE"
case "$REPLY_LINE" in
    "lv-guest "*) ;;
    *)
        echo "demo: no reply from the guest through the published port $PORT; see $LOG" >&2
        exit 1
        ;;
esac

say "now SIGTERM (the pod is deleted)"
kill -TERM "$PID"
set +e
wait "$PID"
rc=$?
set -e
trap - EXIT
sleep 0.3
kill "$TAIL" 2>/dev/null || true

say "launcher exited with status $rc"
say "first line of $PVCS/my-vm-disk/disk.img, as the guest wrote it:"
head -n 1 "$PVCS/my-vm-disk/disk.img"
echo
if [ "$rc" = 0 ] && [ "$(head -n 1 "$PVCS/my-vm-disk/disk.img")" = "$MARKER" ]; then
    say "demo OK: the data is in the PVC, the guest answered on the published port; no launcher, daemon, QEMU or passt process is left"
    pgrep -a -f "qemu-system.*my-vm" && { echo "demo: a QEMU process is left behind" >&2; exit 1; }
    pgrep -a -f "passt.*default_my-vm" && { echo "demo: a passt process is left behind" >&2; exit 1; }
    exit 0
fi
echo "demo: FAILED (exit status $rc); see $LOG" >&2
exit 1
