#!/bin/sh
# node-labeller.sh for the Rust virt-launcher image. virt-handler's DaemonSet runs the launcher
# image as its `virt-launcher` init container with `/bin/sh -c node-labeller.sh` (env
# PREFERRED_VIRTTYPE, HYPERVISOR_DEVICE) and the node's /var/lib/kubevirt-node-labeller/
# mounted; virt-handler's node labeller then reads, from that directory:
#   virsh_domcapabilities.xml  domain capabilities of the host (q35, the preferred virt type
#                              if the hypervisor device is usable, else TCG)
#   supported_features.xml     the CPU model baseline of those capabilities' features
#   capabilities.xml           the host capabilities
# This script starts a private libvirtd (monolithic: our image has no virtqemud) to ask.
set -eu
OUT=${NODE_LABELLER_DIR:-/var/lib/kubevirt-node-labeller}
DEVICE=${HYPERVISOR_DEVICE:-kvm}
PREFERRED=${PREFERRED_VIRTTYPE:-kvm}
say() { echo "node-labeller: $*" >&2; }

arch=$(uname -m)
case "$arch" in
    x86_64) machine=q35 ;;
    *)
        say "$arch: this image is x86_64 only; nothing to label"
        exit 0
        ;;
esac

# The hypervisor device: made from /proc/misc if the runtime did not provide the node, and
# opened to QEMU; without it, TCG.
dev=/dev/$DEVICE
if [ ! -e "$dev" ]; then
    minor=$(awk -v d="$DEVICE" '$2 == d {print $1}' /proc/misc)
    [ -z "$minor" ] || mknod "$dev" c 10 "$minor" || say "cannot create $dev"
fi
virttype=qemu
if [ -e "$dev" ]; then
    chmod o+rw "$dev" || true
    virttype=$PREFERRED
fi
[ ! -e /dev/sev ] || chmod o+rw /dev/sev || true
say "arch $arch, machine $machine, virt type $virttype"

mkdir -p "$OUT" /run/libvirt /var/log/libvirt
libvirtd --daemon
uri=qemu:///system
# The daemon's socket appears once it serves.
i=0
until virsh -c "$uri" version >/dev/null 2>&1; do
    i=$((i + 1))
    [ "$i" -lt 300 ] || {
        say "libvirtd did not answer within 30 s"
        exit 1
    }
    sleep 0.1
done

tmp=$(mktemp -d)
virsh -c "$uri" domcapabilities --machine "$machine" --arch "$arch" --virttype "$virttype" \
    >"$tmp/domcaps.xml"
virsh -c "$uri" hypervisor-cpu-baseline --file "$tmp/domcaps.xml" --features \
    --machine "$machine" --arch "$arch" --virttype "$virttype" >"$tmp/supported_features.xml"
virsh -c "$uri" capabilities >"$tmp/capabilities.xml"
# Into place only when all three were written.
mv "$tmp/domcaps.xml" "$OUT/virsh_domcapabilities.xml"
mv "$tmp/supported_features.xml" "$OUT/supported_features.xml"
mv "$tmp/capabilities.xml" "$OUT/capabilities.xml"
rm -rf "$tmp"
say "wrote $OUT/virsh_domcapabilities.xml, supported_features.xml, capabilities.xml"
