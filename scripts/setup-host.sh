#!/usr/bin/env bash
# Prepare a Debian 12 machine (as root) for building and testing virt-launcher.
# Idempotent: every step checks first and is skipped when already done.
#
#  - apt packages: libvirt 11.x (monolithic daemon + QEMU driver + clients + dev) and QEMU 10.x
#    from Debian's bookworm-backports (the generation KubeVirt v1.9 ships: libvirt 11, QEMU 10),
#    tools for the test guest (busybox-static, cpio, xz-utils), xorriso (cloud-init ISOs),
#    util-linux (losetup, unshare, nsenter), iproute2, g++ (libFuzzer's C++, for fuzz/),
#    and for the launcher image (./devtool image, tests/image.rs): mmdebstrap (the root
#    filesystem from Debian packages), umoci (unpacks the OCI image), runc (runs it:
#    Debian 12's crun refuses this machine's hybrid cgroup v1 layout), jq; for the registry
#    tests (tests/registry.rs): docker-registry (a registry on the loopback address, started by
#    the test; its host-wide service is never started), skopeo (pushes the test's image) and
#    apache2-utils (htpasswd: the registry's bcrypt password file).
#    openssl (test CAs),
#    curl (the import benchmark's baseline), python3-pip (moto, below).
#  - moto[server] from PyPI: the S3-compatible server of tests/datavolume.rs
#    bookworm-backports is enabled in apt's sources and pinned for only the virtualisation
#    packages (/etc/apt/preferences.d/virt-launcher-backports); everything else stays bookworm.
#  - passt 0.0~git20250503.587980c (Debian 13's) built from Debian's source tarball (sha256-
#    pinned; scripts/build-passt.sh) into /usr/local/bin, which libvirt finds first in PATH: Debian 12's passt
#    (2023-03) carries no TCP payload with QEMU 10, and trixie's binary package needs glibc 2.38
#  - users/groups libvirt expects: kvm, libvirt, libvirt-qemu
#  - /var/log/libvirt, /var/run/libvirt, /var/lib/libvirt, /var/cache/libvirt
#  - the Rust toolchain (rustup in ~/.cargo/bin) is present and recent enough
#
# It never starts a host-wide libvirtd/virtlogd: the launcher starts its own private
# daemons. Apt runs with a temporary policy-rc.d that forbids service starts.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

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
# The versions we support and test: libvirt 11.x and QEMU 10.x (KubeVirt v1.9's generation).
LIBVIRT_MAJOR=11
QEMU_MAJOR=10
PACKAGES=(
    libvirt-dev libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
    qemu-system-x86 qemu-utils pkg-config libxml2-utils curl make gcc
    busybox-static cpio xz-utils gzip
    xorriso util-linux iproute2 g++
    nftables
    mmdebstrap umoci runc jq
    docker-registry skopeo apache2-utils
    openssl python3 python3-pip
)
# Packages that must come from bookworm-backports, with the major version each must have.
declare -A BACKPORTED=(
    [libvirt-daemon]=$LIBVIRT_MAJOR [libvirt-daemon-driver-qemu]=$LIBVIRT_MAJOR
    [libvirt-clients]=$LIBVIRT_MAJOR [libvirt-dev]=$LIBVIRT_MAJOR
    [qemu-system-x86]=$QEMU_MAJOR [qemu-utils]=$QEMU_MAJOR
)
SOURCES=/etc/apt/sources.list.d/bookworm-backports.sources
# A mirror may stand in for the archive (VIRT_LAUNCHER_BACKPORTS_URI=http://mirror/debian).
BACKPORTS_URI=${VIRT_LAUNCHER_BACKPORTS_URI:-http://deb.debian.org/debian}
PIN=/etc/apt/preferences.d/virt-launcher-backports

# installed <pkg>: print the installed version, or nothing.
installed() {
    # dpkg-query fails for a package it has never heard of: that is "not installed", not an
    # error (with pipefail, the assignment V=$(installed …) would end the script).
    { dpkg-query -W -f='${Status}\t${Version}\n' "$1" 2>/dev/null || true; } |
        awk -F'\t' '$1 == "install ok installed" {print $2}'
}
# major <debian version>: the upstream major version ("1:10.0.2+ds-2~bpo12+1" → 10).
major() { local v=${1#*:}; echo "${v%%.*}"; }

MISSING=()
for p in "${PACKAGES[@]}"; do
    v=$(installed "$p")
    want=${BACKPORTED[$p]:-}
    if [ -z "$v" ]; then
        MISSING+=("$p")
    elif [ -n "$want" ] && [ "$(major "$v")" != "$want" ]; then
        log "$p $v is not the supported $want.x: upgrading from bookworm-backports"
        MISSING+=("$p")
    fi
done

# Written only when something must be installed; removed again if the install fails, so a
# failed run leaves no source or pin behind that the next run would trust.
ADDED_APT_FILES=()
enable_backports() {
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        cat >"$SOURCES" <<SRC
# written by virt-launcher's scripts/setup-host.sh: libvirt 11.x and QEMU 10.x
Types: deb
URIs: $BACKPORTS_URI
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
        ADDED_APT_FILES+=("$SOURCES")
    fi
    if [ ! -e "$PIN" ]; then
        cat >"$PIN" <<'PINS'
# written by virt-launcher's scripts/setup-host.sh: libvirt 11.x and QEMU 10.x (KubeVirt v1.9's
# generation) from bookworm-backports; everything else stays on bookworm.
Package: libvirt* libnss-libvirt qemu-* seabios ipxe-qemu libslirp0 passt
Pin: release n=bookworm-backports
Pin-Priority: 990
PINS
        ADDED_APT_FILES+=("$PIN")
    fi
}
# apt_fail <what> <log>: undo this run's apt files and stop with one line.
apt_fail() {
    [ "${#ADDED_APT_FILES[@]}" = 0 ] || rm -f "${ADDED_APT_FILES[@]}"
    die "$1 (apt's output: $2). Check that $BACKPORTS_URI bookworm-backports is reachable (apt-get update), then rerun ./devtool setup"
}

NEED_BACKPORTS=0
for p in "${MISSING[@]}"; do
    [ -z "${BACKPORTED[$p]:-}" ] || NEED_BACKPORTS=1
done

if [ "${#MISSING[@]}" -gt 0 ]; then
    log "to install: ${MISSING[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Never let a package start a daemon (host-wide libvirtd/virtlogd).
    POLICY=/usr/sbin/policy-rc.d
    if [ ! -e "$POLICY" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$POLICY"
        chmod 755 "$POLICY"
        trap 'rm -f "$POLICY"' EXIT
    fi
    LOG=/tmp/setup-host-apt.log
    [ "$NEED_BACKPORTS" = 0 ] || enable_backports
    # Update when apt's lists lack the backports suite (or anything), or a package has no
    # candidate, or this run just added the suite.
    if [ "${#ADDED_APT_FILES[@]}" -gt 0 ] || ! ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1 ||
        { [ "$NEED_BACKPORTS" = 1 ] && ! ls /var/lib/apt/lists/*bookworm-backports*_Packages* >/dev/null 2>&1; } ||
        apt-cache policy "${MISSING[@]}" 2>/dev/null | grep -q 'Candidate: (none)'; then
        log "apt-get update"
        apt-get update -q >"$LOG" 2>&1 || apt_fail "apt-get update failed" "$LOG"
        # apt-get update only warns about a suite it cannot fetch (and keeps stale lists).
        if [ "$NEED_BACKPORTS" = 1 ] && grep -qE '^(Err:|W: Failed to fetch|E: Failed to fetch).*bookworm-backports' "$LOG"; then
            apt_fail "bookworm-backports could not be fetched" "$LOG"
        fi
    fi
    if [ "$NEED_BACKPORTS" = 1 ]; then
        for p in "${!BACKPORTED[@]}"; do
            c=$(apt-cache policy "$p" 2>/dev/null | awk '/Candidate:/ {print $2}')
            [ "$(major "$c")" = "${BACKPORTED[$p]}" ] ||
                apt_fail "package $p: no ${BACKPORTED[$p]}.x candidate (apt offers '${c:-none}')" "$LOG"
        done
    fi
    # Only the missing packages are named, so present ones are not upgraded.
    apt-get install -y -q --no-install-recommends "${MISSING[@]}" >"$LOG" 2>&1 || {
        failed=$(grep -oE '^E: .*' "$LOG" | head -n 1)
        apt_fail "apt-get install ${MISSING[*]} failed: ${failed:-see the log}" "$LOG"
    }
    log "installed: ${MISSING[*]} (log: $LOG)"
    DID=$((DID + 1))
else
    log "packages: all present (libvirt $(installed libvirt-daemon), qemu $(installed qemu-system-x86))"
fi

# ------------------------------------------------------------------ passt
# libvirt runs "passt" from its PATH (libvirt 11 resolves helper programs at run time).
# scripts/build-passt.sh holds the pin (version, source tarball, sha256) and builds it.
PASST_VERSION=$("$ROOT/scripts/build-passt.sh" --version)
PASST_BIN=/usr/local/bin/passt
if [ -x "$PASST_BIN" ] && grep -qaF "$PASST_VERSION" "$PASST_BIN"; then
    log "passt: $PASST_VERSION in $PASST_BIN"
else
    log "passt $PASST_VERSION: building from Debian's source ($("$ROOT/scripts/build-passt.sh" --source | cut -f1))"
    t0=$(date +%s)
    "$ROOT/scripts/build-passt.sh" /usr/local/bin || die "passt: scripts/build-passt.sh failed"
    log "passt: built and installed $PASST_BIN in $(($(date +%s) - t0)) s"
    DID=$((DID + 1))
fi
[ "$(command -v passt)" = "$PASST_BIN" ] ||
    log "warning: 'passt' in PATH is $(command -v passt), not $PASST_BIN: put /usr/local/bin first in PATH"

for tool in libvirtd virsh qemu-system-x86_64 qemu-img xorriso losetup unshare nsenter ip cpio busybox g++ \
    mmdebstrap umoci runc jq docker-registry skopeo htpasswd passt openssl curl python3; do
    command -v "$tool" >/dev/null || die "$tool not found after installing packages"
done

# ------------------------------------------------------------------ moto (S3 for the tests)
# tests/datavolume.rs imports DataVolumes from an S3-compatible server: moto in server mode
# (`python3 -m moto.server`, with boto3 for the test's set-up), from PyPI.
if ! python3 -c 'import moto.server, boto3' 2>/dev/null; then
    PIP_LOG=$(mktemp /tmp/setup-host-pip.XXXXXX)
    python3 -m pip install -q 'moto[server]' >"$PIP_LOG" 2>&1 ||
        python3 -m pip install -q --break-system-packages 'moto[server]' >"$PIP_LOG" 2>&1 ||
        die "pip install 'moto[server]' failed (log: $PIP_LOG)"
    log "installed moto[server] (log: $PIP_LOG)"
    DID=$((DID + 1))
fi

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
