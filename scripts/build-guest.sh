#!/usr/bin/env bash
# Build the tiny TCG test guest: a Debian 12 cloud kernel + an initramfs made of
# static busybox, scripts/guest-init.sh as /init and the few kernel modules it needs, plus
# a DHCPv6 client (Debian's busybox has no udhcpc6): wide-dhcpv6-client's dhcp6c with the
# shared libraries it loads (libfl2's libfl.so.2, libc6's libc.so.6 and dynamic loader).
#
#   scripts/build-guest.sh            -> ${GUEST_DIR:-.cache/guest}/{vmlinuz,initramfs.gz}
#   FORCE=1 scripts/build-guest.sh    rebuild even when the outputs are up to date
#
# GUEST_DIR (default .cache/guest) and DEB_CACHE (default .cache/debs) are relative
# to the repository root unless absolute. Also writes kernel-version and modules.txt
# next to the outputs. Needs: apt-get, dpkg-deb, cpio, gzip (xz/zstd only for
# compressed modules). Boot with: console=ttyS0 quiet [lv.* parameters, see guest-init.sh].
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SELF="$ROOT/scripts/build-guest.sh"
INIT="$ROOT/scripts/guest-init.sh"

abs() { case "$1" in /*) echo "$1" ;; *) echo "$ROOT/$1" ;; esac; }
GUEST_DIR=$(abs "${GUEST_DIR:-.cache/guest}")
DEB_CACHE=$(abs "${DEB_CACHE:-.cache/debs}")

# Wanted modules; dependencies are resolved from each module's modinfo, and
# built-in ones are skipped with a warning.
#  virtio core + PCI transport, virtio-blk disks, virtio-serial (console/agent channel),
#  virtio-scsi disks (scsi_mod, sd_mod), ACPI power button (button) + evdev so that
#  busybox acpid can read it from /dev/input/event*; virtio_net for the network tests
#  (udhcpc's raw socket needs AF_PACKET, built into the Debian cloud kernel).
WANTED_MODULES=(
    virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
    virtio_blk virtio_console
    virtio_scsi scsi_mod sd_mod
    sr_mod isofs
    button evdev
    virtio_net
)

log() { echo "build-guest: $*"; }
warn() { echo "build-guest: WARNING: $*" >&2; }
die() {
    echo "build-guest: ERROR: $*" >&2
    exit 1
}

VMLINUZ="$GUEST_DIR/vmlinuz"
INITRD="$GUEST_DIR/initramfs.gz"

if [ "${FORCE:-0}" != 1 ] && [ -s "$VMLINUZ" ] && [ -s "$INITRD" ] &&
    [ "$VMLINUZ" -nt "$SELF" ] && [ "$VMLINUZ" -nt "$INIT" ] &&
    [ "$INITRD" -nt "$SELF" ] && [ "$INITRD" -nt "$INIT" ]; then
    log "up to date: $GUEST_DIR ($(cat "$GUEST_DIR/kernel-version" 2>/dev/null || echo '?'))"
    exit 0
fi

for tool in apt-get apt-cache dpkg-deb cpio gzip find sort; do
    command -v "$tool" >/dev/null || die "missing tool: $tool (run scripts/setup-host.sh)"
done
[ -r "$INIT" ] || die "missing $INIT"

mkdir -p "$GUEST_DIR" "$DEB_CACHE"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/build-guest.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

APT_DL_OPTS=()
[ "$(id -u)" = 0 ] && APT_DL_OPTS=(-o APT::Sandbox::User=root)
APT_UPDATED=0
apt_update_once() {
    if [ "$APT_UPDATED" = 0 ] && [ "$(id -u)" = 0 ]; then
        log "apt-get update (package lists missing or stale)"
        apt-get update -qq || warn "apt-get update failed"
        APT_UPDATED=1
    fi
}

newest_kernel_pkg() {
    apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-cloud-amd64$' 2>/dev/null |
        awk '{print $1}' | sort -V | tail -n 1
}

# fetch <package>: print the path of the package's .deb in DEB_CACHE, downloading
# the candidate version unless it is already cached.
fetch() {
    local pkg=$1 cand f v
    cand=$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ {print $2}')
    for f in "$DEB_CACHE/${pkg}_"*.deb; do
        [ -e "$f" ] || continue
        v=$(dpkg-deb -f "$f" Version 2>/dev/null || true)
        if [ -z "$cand" ] || [ "$cand" = "(none)" ] || [ "$v" = "$cand" ]; then
            echo "$f"
            return 0
        fi
    done
    if [ -z "$cand" ] || [ "$cand" = "(none)" ]; then
        die "no candidate version for $pkg"
    fi
    (cd "$DEB_CACHE" && apt-get download -qq "${APT_DL_OPTS[@]}" "$pkg" >&2) ||
        die "apt-get download $pkg failed"
    for f in "$DEB_CACHE/${pkg}_"*.deb; do
        v=$(dpkg-deb -f "$f" Version 2>/dev/null || true)
        [ "$v" = "$cand" ] && {
            echo "$f"
            return 0
        }
    done
    die "downloaded $pkg but cannot find its .deb in $DEB_CACHE"
}

# ------------------------------------------------------------------ packages
KPKG=$(newest_kernel_pkg)
if [ -z "$KPKG" ]; then
    apt_update_once
    KPKG=$(newest_kernel_pkg)
fi
if [ -z "$KPKG" ]; then
    # Offline and no package lists: fall back to the newest cached kernel.
    KDEB=$(find "$DEB_CACHE" -maxdepth 1 -name 'linux-image-6.1.0-*-cloud-amd64_*.deb' | sort -V | tail -n 1)
    [ -n "$KDEB" ] || die "no linux-image-6.1.0-*-cloud-amd64 package known to apt and none cached"
    KPKG=$(dpkg-deb -f "$KDEB" Package)
    warn "apt knows no cloud kernel; using cached $KDEB"
else
    KDEB=$(fetch "$KPKG")
fi
BDEB=$(fetch busybox-static)
KVER=$(dpkg-deb -f "$KDEB" Version)
log "kernel: $KPKG $KVER"
log "busybox: busybox-static $(dpkg-deb -f "$BDEB" Version)"
DHCP6_PKGS=(wide-dhcpv6-client libfl2 libc6)
for p in "${DHCP6_PKGS[@]}"; do
    d=$(fetch "$p")
    log "dhcpv6 client: $p $(dpkg-deb -f "$d" Version)"
    dpkg-deb -x "$d" "$WORK/dhcp6"
done

dpkg-deb -x "$KDEB" "$WORK/kernel"
dpkg-deb -x "$BDEB" "$WORK/busybox"

KREL=${KPKG#linux-image-}
MODDIR=$(find "$WORK/kernel" -type d -path "*/lib/modules/$KREL" | head -n 1)
[ -n "$MODDIR" ] || die "no lib/modules/$KREL in $KDEB"
KIMAGE="$WORK/kernel/boot/vmlinuz-$KREL"
[ -s "$KIMAGE" ] || die "no boot/vmlinuz-$KREL in $KDEB"
BUSYBOX="$WORK/busybox/bin/busybox"
[ -x "$BUSYBOX" ] || die "no bin/busybox in $BDEB"

# ------------------------------------------------------------------ initramfs tree
R="$WORK/root"
mkdir -p "$R"/{bin,sbin,dev,proc,sys,tmp,run,etc,var/log,var/run,lib/modules}
cp "$BUSYBOX" "$R/bin/busybox"
for applet in $("$BUSYBOX" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$R/bin/$applet"
done
install -m 0755 "$INIT" "$R/init"
# dhcp6c and what it loads (ldd: libfl.so.2, libc.so.6, /lib64/ld-linux-x86-64.so.2). It
# keeps its DUID in /var/lib/dhcpv6 (made by the init).
D6="$WORK/dhcp6"
MA=lib/x86_64-linux-gnu
mkdir -p "$R/$MA" "$R/lib64"
install -m 0755 "$D6/usr/sbin/dhcp6c" "$R/sbin/dhcp6c" || die "no usr/sbin/dhcp6c in wide-dhcpv6-client"
for lib in "usr/$MA/libfl.so.2.0.0" "$MA/libc.so.6" "$MA/ld-linux-x86-64.so.2"; do
    [ -e "$D6/$lib" ] || die "no $lib in ${DHCP6_PKGS[*]}"
    cp -L "$D6/$lib" "$R/$MA/${lib##*/}"
done
ln -sf libfl.so.2.0.0 "$R/$MA/libfl.so.2"
ln -sf "/$MA/ld-linux-x86-64.so.2" "$R/lib64/ld-linux-x86-64.so.2"
# Not required (the init reopens /dev/console after mounting devtmpfs), but lets the
# kernel give init a console from the start.
if [ "$(id -u)" = 0 ]; then
    mknod -m 600 "$R/dev/console" c 5 1 2>/dev/null || true
    mknod -m 666 "$R/dev/null" c 1 3 2>/dev/null || true
fi

# ------------------------------------------------------------------ modules
declare -A MOD_DONE=()
declare -A MOD_FILE=()
ORDER=()

while IFS= read -r f; do
    b=${f##*/}
    b=${b%%.ko*}
    MOD_FILE[$b]=$f
    MOD_FILE[${b//-/_}]=$f
done < <(find "$MODDIR" -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz')

is_builtin() {
    local m=$1
    [ -r "$MODDIR/modules.builtin" ] &&
        grep -Eq "/(${m}|${m//_/-})\.ko\$" "$MODDIR/modules.builtin"
}

# stage <file> <name>: uncompressed copy in the initramfs (busybox insmod may not
# read compressed modules).
stage() {
    local src=$1 dst="$R/lib/modules/$2.ko"
    case "$src" in
        *.ko) cp "$src" "$dst" ;;
        *.ko.xz) xz -dc "$src" >"$dst" || die "xz -d $src (install xz-utils)" ;;
        *.ko.zst) zstd -qdc "$src" >"$dst" || die "zstd -d $src (install zstd)" ;;
        *.ko.gz) gzip -dc "$src" >"$dst" ;;
    esac
}

add_module() {
    local m=${1//-/_} dep deps
    [ -z "${MOD_DONE[$m]:-}" ] || return 0
    MOD_DONE[$m]=1
    if [ -z "${MOD_FILE[$m]:-}" ]; then
        if is_builtin "$m"; then
            warn "module $m is built into the kernel, skipped"
        else
            warn "module $m not found in $KPKG and not built in, skipped"
        fi
        return 0
    fi
    stage "${MOD_FILE[$m]}" "$m"
    deps=$(tr '\0' '\n' <"$R/lib/modules/$m.ko" | grep -a '^depends=' | head -n 1 | cut -d= -f2 || true)
    for dep in ${deps//,/ }; do
        add_module "$dep"
    done
    ORDER+=("$m.ko")
}

for m in "${WANTED_MODULES[@]}"; do
    add_module "$m"
done
printf '%s\n' "${ORDER[@]}" >"$R/lib/modules/load-order"
log "modules (load order): ${ORDER[*]%.ko}"

# ------------------------------------------------------------------ pack
# Same inputs -> same bytes: fixed mtimes, sorted names, cpio --reproducible, gzip -n.
find "$R" -exec touch -h -d @0 {} +
CPIO_OPTS=(-o -H newc -R 0:0 --quiet)
cpio --help 2>/dev/null | grep -q -- --reproducible && CPIO_OPTS+=(--reproducible)
(cd "$R" && find . | LC_ALL=C sort | cpio "${CPIO_OPTS[@]}" | gzip -9 -n) >"$INITRD.tmp"
cp "$KIMAGE" "$VMLINUZ.tmp"
mv "$VMLINUZ.tmp" "$VMLINUZ"
mv "$INITRD.tmp" "$INITRD"
echo "$KPKG $KVER" >"$GUEST_DIR/kernel-version"
printf '%s\n' "${ORDER[@]%.ko}" >"$GUEST_DIR/modules.txt"
log "wrote $VMLINUZ ($(du -k "$VMLINUZ" | cut -f1) KiB), $INITRD ($(du -k "$INITRD" | cut -f1) KiB)"
