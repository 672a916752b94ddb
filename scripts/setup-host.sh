#!/usr/bin/env bash
# Prepare a Debian 12 machine (as root) for building and testing virt-launcher.
# Idempotent: every step checks first and is skipped when already done.
#
#  - apt packages: libvirt (daemon + qemu driver + clients + dev), QEMU 7.2 (with
#    qemu-utils pinned to bookworm: a newer qemu-utils conflicts with qemu-system-x86 7.2),
#    tools for the test guest (busybox-static, cpio, xz-utils), xorriso (cloud-init ISOs),
#    util-linux (losetup, unshare, nsenter), iproute2, g++ (libFuzzer's C++, for fuzz/)
#  - users/groups libvirt expects: kvm, libvirt, libvirt-qemu
#  - /var/log/libvirt, /var/run/libvirt, /var/lib/libvirt, /var/cache/libvirt
#  - the Rust toolchain (rustup in ~/.cargo/bin) is present and recent enough
#
# It never starts a host-wide libvirtd/virtlogd: the launcher starts its own private
# daemons. Apt runs with a temporary policy-rc.d that forbids service starts.
set -euo pipefail

log() { echo "setup-host: $*"; }
die() {
    echo "setup-host: ERROR: $*" >&2
    exit 1
}

[ "$(id -u)" = 0 ] || die "run as root"
# shellcheck disable=SC1091
[ -r /etc/os-release ] && . /etc/os-release
[ "${VERSION_CODENAME:-}" = bookworm ] ||
    log "warning: expected Debian 12 (bookworm), found ${PRETTY_NAME:-unknown}"

DID=0 # number of changes made

# ------------------------------------------------------------------ apt packages
PACKAGES=(
    libvirt-dev libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
    qemu-system-x86 qemu-utils pkg-config libxml2-utils
    busybox-static cpio xz-utils gzip
    xorriso util-linux iproute2 g++
)

# installed <pkg>: print the installed version, or nothing.
installed() {
    # dpkg-query fails for a package it has never heard of: that is "not installed", not an
    # error (with pipefail, the assignment QSV=$(installed …) would end the script).
    { dpkg-query -W -f='${Status}\t${Version}\n' "$1" 2>/dev/null || true; } |
        awk -F'\t' '$1 == "install ok installed" {print $2}'
}

MISSING=()
for p in "${PACKAGES[@]}"; do
    [ -n "$(installed "$p")" ] || MISSING+=("$p")
done
# qemu-utils must come from the same QEMU (7.2, bookworm) as qemu-system-x86.
QSV=$(installed qemu-system-x86)
QUV=$(installed qemu-utils)
# Compare the upstream release (e.g. "1:7.2" of "1:7.2+dfsg-7+deb12u18+b3").
if [ -n "$QUV" ] && [ -n "$QSV" ] && [ "${QUV%%[+-]*}" != "${QSV%%[+-]*}" ]; then
    log "qemu-utils $QUV does not match qemu-system-x86 $QSV: reinstalling from bookworm"
    MISSING+=(qemu-utils)
fi

if [ "${#MISSING[@]}" -gt 0 ]; then
    log "missing packages: ${MISSING[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Never let a package start a daemon (host-wide libvirtd/virtlogd).
    POLICY=/usr/sbin/policy-rc.d
    if [ ! -e "$POLICY" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$POLICY"
        chmod 755 "$POLICY"
        trap 'rm -f "$POLICY"' EXIT
    fi
    # The verified line from the host notes; qemu-utils/bookworm + --allow-downgrades
    # avoids "held broken packages" when the image carries a newer qemu-utils.
    # Only the missing packages are named, so present ones are not upgraded.
    INSTALL=(apt-get install -y -q --no-install-recommends --allow-downgrades)
    NEED_QEMU_UTILS=0
    for p in "${MISSING[@]}"; do
        case "$p" in
            qemu-utils) NEED_QEMU_UTILS=1 ;;
            qemu-system-x86) NEED_QEMU_UTILS=1 && INSTALL+=(qemu-system-x86) ;;
            *) INSTALL+=("$p") ;;
        esac
    done
    [ "$NEED_QEMU_UTILS" = 0 ] || INSTALL+=(qemu-utils/bookworm)
    UPDATED=0
    # Update first only when apt cannot know the packages (no lists, or no candidate).
    if ! ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1 ||
        apt-cache policy "${MISSING[@]}" 2>/dev/null | grep -q 'Candidate: (none)'; then
        log "apt-get update"
        apt-get update -q >/dev/null
        UPDATED=1
    fi
    if ! "${INSTALL[@]}" >/tmp/setup-host-apt.log 2>&1; then
        [ "$UPDATED" = 0 ] || {
            tail -n 20 /tmp/setup-host-apt.log >&2
            die "apt-get install failed (log: /tmp/setup-host-apt.log)"
        }
        log "apt-get install failed; apt-get update and retry"
        apt-get update -q >/dev/null
        "${INSTALL[@]}" >/tmp/setup-host-apt.log 2>&1 || {
            tail -n 20 /tmp/setup-host-apt.log >&2
            die "apt-get install failed (log: /tmp/setup-host-apt.log)"
        }
    fi
    log "installed: ${MISSING[*]} (log: /tmp/setup-host-apt.log)"
    DID=$((DID + 1))
else
    log "packages: all present (libvirt $(installed libvirt-daemon), qemu $(installed qemu-system-x86))"
fi

for tool in libvirtd virtlogd virsh qemu-system-x86_64 qemu-img xorriso losetup unshare nsenter ip cpio busybox g++; do
    command -v "$tool" >/dev/null || die "$tool not found after installing packages"
done

# ------------------------------------------------------------------ users, groups
for g in kvm libvirt libvirt-qemu; do
    if ! getent group "$g" >/dev/null; then
        groupadd -r "$g"
        log "created group $g"
        DID=$((DID + 1))
    fi
done
if ! getent passwd libvirt-qemu >/dev/null; then
    useradd -r -g libvirt-qemu -G kvm -d /var/lib/libvirt -s /usr/sbin/nologin \
        -c "Libvirt Qemu" libvirt-qemu
    log "created user libvirt-qemu"
    DID=$((DID + 1))
fi

# ------------------------------------------------------------------ directories
for d in /var/log/libvirt /var/run/libvirt /var/lib/libvirt /var/cache/libvirt; do
    if [ ! -d "$d" ]; then
        mkdir -p "$d"
        log "created $d"
        DID=$((DID + 1))
    fi
done

if [ -c /dev/kvm ]; then
    log "/dev/kvm present (nested KVM here: tests boot guests with type='qemu' / TCG)"
else
    log "no /dev/kvm: only TCG (type='qemu') guests will run"
fi

# A host-wide daemon is not ours to stop, but say so: it would share /run/libvirt.
if pids=$(pidof libvirtd virtqemud 2>/dev/null); then
    log "note: a libvirt daemon is running (pid $pids); setup did not start it"
fi

# ------------------------------------------------------------------ Rust toolchain
CARGO_BIN="${CARGO_HOME:-$HOME/.cargo}/bin"
CARGO_ON_PATH=1
if ! command -v cargo >/dev/null; then
    CARGO_ON_PATH=0
    export PATH="$CARGO_BIN:$PATH"
fi
if ! command -v cargo >/dev/null || ! command -v rustc >/dev/null; then
    die "no Rust toolchain (expected rustup in $CARGO_BIN); install rustup, then rerun"
fi
RUSTC_VER=$(rustc --version | awk '{print $2}')
NEED=1.85 # Cargo.toml rust-version
if [ "$(printf '%s\n%s\n' "$NEED" "$RUSTC_VER" | sort -V | head -n 1)" != "$NEED" ]; then
    die "rustc $RUSTC_VER is older than $NEED (rustup update)"
fi
log "rust: rustc $RUSTC_VER, $(cargo --version | awk '{print $1, $2}') in $(dirname "$(command -v cargo)")"
if [ "$CARGO_ON_PATH" = 0 ]; then
    log "note: cargo was not on your PATH; run: export PATH=\"$CARGO_BIN:\$PATH\""
fi

if [ "$DID" = 0 ]; then
    log "nothing to do: host already set up"
else
    log "done ($DID change(s))"
fi
