#!/usr/bin/env bash
# Builds the virt-launcher OCI image without a container daemon or registry (as root, Debian 12):
#
#   scripts/build-image.sh [BIN_DIR]      BIN_DIR: the release binaries (default target/release)
#
# Two layers, each a reproducible tar (sorted, fixed mtimes, numeric owners, gzip -n):
#  1. base: a Debian 12 root filesystem made by mmdebstrap from the packages the launcher runs
#     (libvirt 11 daemon + QEMU driver and QEMU 10 from bookworm-backports, pinned as
#     setup-host.sh pins them; OVMF, qemu-utils, xorriso, virsh for node-labeller.sh),
#     no apt, no docs/man/locales,
#     and passt built from Debian 13's sha256-pinned source by scripts/build-passt.sh (Debian
#     12's passt has no --vhost-user, which libvirt 11 needs for KubeVirt >= 1.8's
#     passtBinding) in /usr/bin, recorded in packages.tsv (version without a Debian revision)
#     and in /usr/share/virt-launcher/sources.tsv (tarball URL, sha256, binary sha256),
#     no apt lists or caches; KubeVirt's layout: user qemu 107:107, /var/run -> ../run,
#     libvirt's directories; /usr/share/virt-launcher/packages.tsv lists every package with its
#     pinned version (the SBOM). Cached in /var/cache/virt-launcher/image/base-<key>/ (VL_IMAGE_CACHE),
#     keyed on this script and the mirror.
#  2. launcher: /usr/bin/virt-launcher, virt-launcher-monitor, launcherctl, virt-launcher-import
#     (built on the host; they need only libc), container-disk (static), virt-tail and
#     virt-probe (symlinks to virt-launcher), virt-freezer and node-labeller.sh (container/bin/: KubeVirt's
#     command lines, ours) and /usr/share/virt-launcher/binaries.sha256.
#
# Result: target/image/<tag>/oci (an OCI image layout) and target/image/<tag>/virt-launcher.oci.tar
# (the same as an oci-archive for `skopeo copy oci-archive:…`); target/image/current links to
# the last one built. The tag is <crate version>-<12 hex of the layers' digests>: the same
# inputs give the same tag and the same bytes. Quick when nothing changed (both caches hit).
#
# Every failure is one line on stderr and a non-zero exit; everything is built in temporary
# directories and renamed into place at the end, so a failed build leaves nothing the next
# one would pick up.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN_DIR=${1:-${CARGO_TARGET_DIR:-$ROOT/target}/release}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=$TARGET/image
# The Debian layer's cache is keyed on this script's content, so clones and worktrees share it
# (CI runs in a fresh clone).
CACHE=${VL_IMAGE_CACHE:-/var/cache/virt-launcher/image}
MIRROR=${VIRT_LAUNCHER_BACKPORTS_URI:-http://deb.debian.org/debian}
NAME=virt-launcher

die() {
    echo "build-image: ERROR: $*" >&2
    exit 1
}
log() { echo "build-image: $*"; }

[ "$(id -u)" = 0 ] || die "run as root (mmdebstrap makes the root filesystem as root)"
for tool in mmdebstrap tar gzip sha256sum jq dpkg-query strip curl make cc; do
    command -v "$tool" >/dev/null || die "$tool not found (./devtool setup installs it)"
done
BINARIES=(virt-launcher virt-launcher-monitor launcherctl virt-launcher-import)
for b in "${BINARIES[@]}"; do
    [ -x "$BIN_DIR/$b" ] || die "$BIN_DIR/$b missing (cargo build --release --locked --bins)"
done
# container-disk runs inside images that are not ours (a containerDisk image may have no libc:
# virt-controller's init container copies it there): a static release build of its own crate,
# in its own target directory (RUSTFLAGS would rebuild everything else). Tens of seconds once.
STATIC_TARGET=$TARGET/static
log "container-disk (static)"
RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --locked --release \
    -p container-disk --target x86_64-unknown-linux-gnu --target-dir "$STATIC_TARGET" ||
    die "building container-disk failed"
CONTAINER_DISK=$STATIC_TARGET/x86_64-unknown-linux-gnu/release/container-disk
if readelf -l "$CONTAINER_DISK" | grep -q INTERP; then
    die "$CONTAINER_DISK is not static"
fi

# >>> base: everything from here to "<<< base" makes the Debian layer, and is its cache key.
# The packages of the runtime layer. The virtualisation packages come from bookworm-backports
# (the pin below); everything else from bookworm. Recommends are not installed.
PACKAGES=(
    libvirt-daemon libvirt-daemon-driver-qemu
    qemu-system-x86 qemu-utils ovmf xorriso
    # virsh, for node-labeller.sh (virt-handler's init container runs the launcher image).
    libvirt-clients
    # libvirt-daemon-driver-qemu depends on "systemd-container | sysvinit-core": the
    # smaller alternative (no systemd in a container).
    sysvinit-core
)
PIN='Package: libvirt* libnss-libvirt qemu-* seabios ipxe-qemu libslirp0
Pin: release n=bookworm-backports
Pin-Priority: 990'
# Paths dpkg never unpacks into the image: documentation, manuals, translations, and QEMU
# firmware for machines other than x86 PCs (the copyright files stay: they are the licences).
EXCLUDES=(
    '/usr/share/doc/*' '/usr/share/man/*' '/usr/share/info/*' '/usr/share/locale/*'
    '/usr/share/lintian/*' '/usr/share/bash-completion/*' '/usr/share/zsh/*'
    '/usr/share/qemu/*ppc*' '/usr/share/qemu/*s390*' '/usr/share/qemu/*sparc*' '/usr/share/qemu/*riscv*'
    '/usr/share/qemu/*hppa*' '/usr/share/qemu/*openbios*' '/usr/share/qemu/*skiboot*' '/usr/share/qemu/*u-boot*'
    '/usr/share/qemu/*edk2-arm*' '/usr/share/qemu/*edk2-aarch64*' '/usr/share/qemu/*edk2-riscv*'
    '/usr/share/qemu/*edk2-loongarch*' '/usr/share/qemu/*palcode*' '/usr/share/qemu/*canyonlands*'
    '/usr/share/qemu/*petalogix*' '/usr/share/qemu/*bamboo*' '/usr/share/qemu/*npcm7xx*' '/usr/share/qemu/*qemu_vga.ndrv'
    # QEMU's 32-bit PC and microvm emulators: KubeVirt's domains are x86_64 "q35"/"pc" ones.
    '/usr/bin/qemu-system-i386' '/usr/bin/qemu-system-x86_64-microvm'
)
# Packages the dependencies bring in that nothing in the pod runs (daemons of a full system,
# and perl for usrmerge's one-time conversion): purged after the install, ignoring the
# dependencies that name them. packages.tsv lists what stays.
PURGE=(
    polkitd libpolkit-agent-1-0 libpolkit-gobject-1-0 elogind libpam-elogind
    dbus dbus-bin dbus-daemon dbus-session-bus-common dbus-system-bus-common
    cron cron-daemon-common usrmerge libfile-find-rule-perl libnumber-compare-perl
    libtext-glob-perl perl perl-modules-5.36 libperl5.36
)
DPKG_OPTS=()
for p in "${EXCLUDES[@]}"; do DPKG_OPTS+=(--dpkgopt="path-exclude=$p"); done
DPKG_OPTS+=(--dpkgopt='path-include=/usr/share/doc/*/copyright')

sha() { sha256sum | cut -d' ' -f1; }

# reproducible_tar <dir> <out.tar.gz>: the layer (sorted names, fixed times, numeric
# owners, no atime/ctime), gzip without a name or time stamp. Prints the uncompressed
# digest (the diff_id).
reproducible_tar() {
    local dir=$1 out=$2 diff
    (cd "$dir" && find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
        tar --format=posix --numeric-owner --mtime="@$SOURCE_DATE_EPOCH" --clamp-mtime \
            --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
            --no-recursion -cf "$out.tar" --files-from=-) || die "tar of $dir failed"
    diff=$(sha <"$out.tar")
    gzip -n -6 <"$out.tar" >"$out" || die "gzip of $out failed"
    rm -f "$out.tar"
    echo "sha256:$diff"
}

mkdir -p "$CACHE" "$OUT"
WORK=$(mktemp -d "$OUT/.build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# ------------------------------------------------------------------ layer 1: the base
BASE_KEY=$( {
    sed -n '/^# >>> base/,/^# <<< base/p' "${BASH_SOURCE[0]}"
    cat "$ROOT/scripts/build-passt.sh"
    echo "$MIRROR"
} | sha | cut -c1-16)
BASE=$CACHE/base-$BASE_KEY
# The base's time stamps: fixed, so that the same packages give the same layer.
export SOURCE_DATE_EPOCH=1704067200 # 2024-01-01T00:00:00Z
if [ -s "$BASE/layer.tar.gz" ] && [ -s "$BASE/diffid" ]; then
    touch "$BASE"
    log "base layer: cached ($BASE)"
else
    log "base layer: mmdebstrap bookworm + bookworm-backports (a few minutes)"
    RFS=$WORK/rootfs
    printf '%s\n' "$PIN" >"$WORK/pin"
    if ! mmdebstrap --mode=root --variant=essential --format=directory \
        --aptopt='Acquire::Retries "3"' --aptopt='APT::Install-Recommends "false"' \
        "${DPKG_OPTS[@]}" \
        --setup-hook="mkdir -p \"\$1/etc/apt/preferences.d\" && cp '$WORK/pin' \"\$1/etc/apt/preferences.d/virt-launcher-backports\"" \
        --customize-hook="chroot \"\$1\" dpkg --purge --force-depends ${PURGE[*]}" \
        --include="$(
            IFS=,
            echo "${PACKAGES[*]}"
        )" \
        bookworm "$RFS" \
        "deb $MIRROR bookworm main" "deb $MIRROR bookworm-updates main" \
        "deb $MIRROR bookworm-backports main" \
        "deb ${VIRT_LAUNCHER_SECURITY_URI:-http://deb.debian.org/debian-security} bookworm-security main" \
        >"$WORK/mmdebstrap.log" 2>&1; then
        cp "$WORK/mmdebstrap.log" "$OUT/mmdebstrap.log"
        die "mmdebstrap failed: $(grep -E '^(E: |dpkg: error|W: Failed to fetch|Err:)' "$OUT/mmdebstrap.log" | head -n 1) (log: $OUT/mmdebstrap.log)"
    fi
    # The versions that must be there (setup-host.sh's pin): libvirt 11, QEMU 10.
    ver() { dpkg-query --admindir="$RFS/var/lib/dpkg" -W -f='${Version}' "$1" 2>/dev/null; }
    for want in libvirt-daemon:11 qemu-system-x86:10; do
        v=$(ver "${want%%:*}")
        v=${v#*:}
        [ "${v%%.*}" = "${want#*:}" ] || die "${want%%:*} is ${v:-missing}, not ${want#*:}.x (is bookworm-backports reachable at $MIRROR?)"
    done
    # passt from source (no Debian package of it in the image: nothing depends on one).
    [ "$(dpkg-query --admindir="$RFS/var/lib/dpkg" -W -f='${db:Status-Status}' passt 2>/dev/null)" != installed ] ||
        die "Debian's passt package got into the image (a dependency?): the source-built one replaces it"
    "$ROOT/scripts/build-passt.sh" "$RFS/usr/bin" >"$WORK/passt.log" 2>&1 ||
        die "passt: $(tail -n 1 "$WORK/passt.log")"
    PASST_VERSION=$("$ROOT/scripts/build-passt.sh" --version)
    # The SBOM: every package with its version, architecture and source; passt, built here
    # from Debian's upstream tarball, with its upstream version (no Debian revision).
    mkdir -p "$RFS/usr/share/virt-launcher"
    {
        dpkg-query --admindir="$RFS/var/lib/dpkg" -W \
            -f='${Package}\t${Version}\t${Architecture}\t${source:Package}\t${source:Version}\n'
        printf 'passt\t%s\tamd64\tpasst\t%s\n' "$PASST_VERSION" "$PASST_VERSION"
    } | LC_ALL=C sort >"$RFS/usr/share/virt-launcher/packages.tsv"
    # What was built from source, from what: path, version, tarball, its sha256, the binary's.
    for b in passt passt.avx2; do
        printf '/usr/bin/%s\t%s\t%s\t%s\n' "$b" "$PASST_VERSION" \
            "$("$ROOT/scripts/build-passt.sh" --source)" "$(sha <"$RFS/usr/bin/$b")"
    done >"$RFS/usr/share/virt-launcher/sources.tsv"
    # KubeVirt's users: qemu 107:107 (non-root VMIs; fsGroup 107). libvirtd's QEMU driver
    # resolves its built-in user libvirt-qemu before reading qemu.conf and refuses to start
    # without it (libvirt-daemon-system, which makes it, ships host-wide services: not here).
    grep -q '^kvm:' "$RFS/etc/group" || echo 'kvm:x:108:qemu,libvirt-qemu' >>"$RFS/etc/group"
    echo 'qemu:x:107:' >>"$RFS/etc/group"
    echo 'libvirt-qemu:x:64055:' >>"$RFS/etc/group"
    echo 'qemu:x:107:107:qemu:/home/qemu:/usr/sbin/nologin' >>"$RFS/etc/passwd"
    echo 'libvirt-qemu:x:64055:64055:Libvirt Qemu:/var/lib/libvirt:/usr/sbin/nologin' >>"$RFS/etc/passwd"
    for u in qemu libvirt-qemu; do echo "$u:*:19723:0:99999:7:::" >>"$RFS/etc/shadow"; done
    # /var/run -> ../run, relative (Debian's is /run): virt-handler resolves paths in the pod
    # as /proc/<pid>/root/var/run/…, and opens the console socket under /run/kubevirt-private
    # without following links; KubeVirt's image has the same link.
    rm -rf "$RFS/var/run"
    ln -s ../run "$RFS/var/run"
    mkdir -p "$RFS/run/libvirt" "$RFS/run/kubevirt" "$RFS/run/kubevirt-private" \
        "$RFS/run/kubevirt-ephemeral-disks" "$RFS/var/log/libvirt" "$RFS/var/lib/libvirt" \
        "$RFS/var/cache/libvirt" "$RFS/etc/libvirt" "$RFS/home/qemu"
    chown 107:107 "$RFS/home/qemu"
    # Nothing of the build: apt's lists and caches, dpkg's logs and backups, /dev's nodes
    # (the runtime makes /dev), machine-id, caches of ldconfig's helpers.
    rm -rf "$RFS"/var/lib/apt/lists/* "$RFS"/var/cache/apt/* "$RFS"/var/cache/debconf/*-old \
        "$RFS"/var/log/* "$RFS"/var/lib/dpkg/*-old "$RFS"/dev/* "$RFS"/tmp/* \
        "$RFS"/etc/machine-id "$RFS"/var/cache/ldconfig/aux-cache "$RFS"/etc/apt/preferences.d
    : >"$RFS/etc/machine-id"
    # xml-core writes its catalog entries in hash order: sorted, the layer is the same on
    # every build (the only difference two builds of the same packages had).
    rm -f "$RFS"/etc/xml/*.old
    for f in "$RFS/etc/xml/catalog" "$RFS/var/lib/xml-core/catalog"; do
        [ -f "$f" ] || continue
        first=$(grep -n '^<delegate' "$f" | head -n 1 | cut -d: -f1)
        last=$(grep -n '^<delegate' "$f" | tail -n 1 | cut -d: -f1)
        [ -n "$first" ] || continue
        { head -n $((first - 1)) "$f"; sed -n "${first},${last}p" "$f" | LC_ALL=C sort
            tail -n +$((last + 1)) "$f"; } >"$f.sorted"
        mv "$f.sorted" "$f"
    done
    mkdir -p "$RFS/var/log/libvirt"
    NEWBASE=$WORK/base
    mkdir -p "$NEWBASE"
    cp "$RFS/usr/share/virt-launcher/packages.tsv" "$NEWBASE/packages.tsv"
    du -sb "$RFS" | cut -f1 >"$NEWBASE/unpacked"
    log "base layer: packing $(($(cat "$NEWBASE/unpacked") >> 20)) MiB"
    reproducible_tar "$RFS" "$NEWBASE/layer.tar.gz" >"$NEWBASE/diffid"
    rm -rf "$RFS"
    rm -rf "$BASE"
    mv "$NEWBASE" "$BASE"
    # Other bases (older inputs) unused for a week go.
    find "$CACHE" -mindepth 1 -maxdepth 1 -name 'base-*' ! -name "base-$BASE_KEY" -mtime +7 \
        -exec rm -rf {} +
    log "base layer: $(wc -l <"$BASE/packages.tsv") packages, cached in $BASE"
fi
# <<< base

# ------------------------------------------------------------------ layer 2: the launcher
L2=$WORK/launcher
mkdir -p "$L2/usr/bin" "$L2/usr/share/virt-launcher"
# Without debug information (a release build has none; a debug build's is most of its size).
for b in "${BINARIES[@]}"; do
    strip --strip-debug -o "$L2/usr/bin/$b" "$BIN_DIR/$b" || die "strip $BIN_DIR/$b failed"
    chmod 0755 "$L2/usr/bin/$b"
done
# KubeVirt's small clients that we provide: scripts (container/bin/: virt-freezer,
# node-labeller.sh) and tools of the launcher binary, run through a symlink (virt-tail, the
# console-log sidecar; virt-probe, the exec and guest-agent-ping probes).
SCRIPTS=(virt-freezer node-labeller.sh)
for b in "${SCRIPTS[@]}"; do
    install -m 0755 "$ROOT/container/bin/$b" "$L2/usr/bin/$b"
done
for b in virt-tail virt-probe; do
    ln -s virt-launcher "$L2/usr/bin/$b"
done
install -m 0755 "$CONTAINER_DISK" "$L2/usr/bin/container-disk"
(cd "$L2/usr/bin" && sha256sum "${BINARIES[@]}" container-disk "${SCRIPTS[@]}") >"$L2/usr/share/virt-launcher/binaries.sha256"
VERSION=$(awk -F'"' '/^version *=/ {print $2; exit}' "$ROOT/Cargo.toml")
REVISION=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)
L2_DIFF=$(reproducible_tar "$L2" "$WORK/launcher.tar.gz")

BASE_DIFF=$(cat "$BASE/diffid")
TAG=$VERSION-$(printf '%s\n%s\n' "$BASE_DIFF" "$L2_DIFF" | sha | cut -c1-12)
DEST=$OUT/$TAG
if [ -s "$DEST/virt-launcher.oci.tar" ] && [ -s "$DEST/oci/index.json" ]; then
    log "image $NAME:$TAG: unchanged ($DEST)"
else
    log "image $NAME:$TAG: assembling"
    L=$WORK/oci
    mkdir -p "$L/blobs/sha256"
    blob() { # blob <file>: moves it into the layout by digest, prints the digest
        local d
        d=$(sha <"$1")
        mv "$1" "$L/blobs/sha256/$d"
        echo "sha256:$d"
    }
    cp "$BASE/layer.tar.gz" "$WORK/base.tar.gz"
    BASE_SIZE=$(stat -c %s "$WORK/base.tar.gz")
    L2_SIZE=$(stat -c %s "$WORK/launcher.tar.gz")
    BASE_DIGEST=$(blob "$WORK/base.tar.gz")
    L2_DIGEST=$(blob "$WORK/launcher.tar.gz")
    CREATED=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)
    # The image config. KubeVirt's launcher image: entrypoint /usr/bin/virt-launcher, user
    # 107 (virt-controller always sets the pod's command and runAsUser; the Root feature gate's
    # pods run as 0); the labels say what is inside.
    jq -n --arg created "$CREATED" --arg base "$BASE_DIFF" --arg l2 "$L2_DIFF" \
        --arg version "$VERSION" --arg revision "$REVISION" --arg tag "$TAG" \
        --arg libvirt "$(awk -F'\t' '$1 == "libvirt-daemon" {print $2}' "$BASE/packages.tsv")" \
        --arg qemu "$(awk -F'\t' '$1 == "qemu-system-x86" {print $2}' "$BASE/packages.tsv")" '{
        created: $created, architecture: "amd64", os: "linux",
        config: {
          User: "107",
          Env: ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
          Entrypoint: ["/usr/bin/virt-launcher"],
          WorkingDir: "/",
          Labels: {
            "org.opencontainers.image.title": "virt-launcher",
            "org.opencontainers.image.description": "KubeVirt virt-launcher in Rust, with libvirt and QEMU",
            "org.opencontainers.image.version": $version,
            "org.opencontainers.image.revision": $revision,
            "org.opencontainers.image.ref.name": $tag,
            "org.opencontainers.image.base.name": "debian:bookworm (mmdebstrap)",
            "io.kubevirt.launcher.libvirt": $libvirt,
            "io.kubevirt.launcher.qemu": $qemu,
            "io.kubevirt.launcher.sbom": "/usr/share/virt-launcher/packages.tsv"
          }
        },
        rootfs: {type: "layers", diff_ids: [$base, $l2]},
        history: [
          {created: $created, created_by: "mmdebstrap bookworm (scripts/build-image.sh)"},
          {created: $created, created_by: "virt-launcher binaries (scripts/build-image.sh)"}
        ]
      }' >"$WORK/config.json"
    CONFIG_SIZE=$(stat -c %s "$WORK/config.json")
    CONFIG_DIGEST=$(blob "$WORK/config.json")
    jq -n --arg c "$CONFIG_DIGEST" --argjson cs "$CONFIG_SIZE" \
        --arg b "$BASE_DIGEST" --argjson bs "$BASE_SIZE" --arg l "$L2_DIGEST" --argjson ls "$L2_SIZE" '{
        schemaVersion: 2, mediaType: "application/vnd.oci.image.manifest.v1+json",
        config: {mediaType: "application/vnd.oci.image.config.v1+json", digest: $c, size: $cs},
        layers: [
          {mediaType: "application/vnd.oci.image.layer.v1.tar+gzip", digest: $b, size: $bs},
          {mediaType: "application/vnd.oci.image.layer.v1.tar+gzip", digest: $l, size: $ls}
        ]}' >"$WORK/manifest.json"
    MANIFEST_SIZE=$(stat -c %s "$WORK/manifest.json")
    MANIFEST_DIGEST=$(blob "$WORK/manifest.json")
    jq -n --arg m "$MANIFEST_DIGEST" --argjson ms "$MANIFEST_SIZE" --arg tag "$TAG" '{
        schemaVersion: 2, mediaType: "application/vnd.oci.image.index.v1+json",
        manifests: [{mediaType: "application/vnd.oci.image.manifest.v1+json", digest: $m, size: $ms,
          annotations: {"org.opencontainers.image.ref.name": $tag}}]}' >"$L/index.json"
    echo '{"imageLayoutVersion":"1.0.0"}' >"$L/oci-layout"
    # The oci-archive: the layout as a tar (what skopeo's oci-archive: transport reads).
    (cd "$L" && find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
        tar --format=posix --numeric-owner --owner=0 --group=0 --mtime="@$SOURCE_DATE_EPOCH" \
            --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
            --no-recursion -cf "$WORK/virt-launcher.oci.tar" --files-from=-)
    echo "$TAG" >"$WORK/tag"
    echo $((BASE_SIZE + L2_SIZE + CONFIG_SIZE + MANIFEST_SIZE)) >"$WORK/compressed"
    echo $(($(cat "$BASE/unpacked") + $(du -sb "$L2" | cut -f1))) >"$WORK/unpacked"
    mkdir "$WORK/final"
    mv "$L" "$WORK/virt-launcher.oci.tar" "$WORK/tag" "$WORK/compressed" "$WORK/unpacked" "$WORK/final/"
    cp "$BASE/packages.tsv" "$WORK/final/packages.tsv"
    rm -rf "$DEST"
    mv "$WORK/final" "$DEST"
fi
# target/image/current -> <tag>, replaced atomically.
ln -sfn "$TAG" "$OUT/.current.new"
mv -T "$OUT/.current.new" "$OUT/current"
# Older images (other tags) go: each is the size of the image.
for d in "$OUT"/*/; do
    d=${d%/}
    [ -L "$d" ] || [ "$(basename "$d")" = "$TAG" ] || rm -rf "$d"
done
rm -f "$OUT/mmdebstrap.log"
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
log "image $NAME:$TAG: compressed $(mib "$(cat "$DEST/compressed")"), unpacked $(mib "$(cat "$DEST/unpacked")"), $(wc -l <"$DEST/packages.tsv") packages"
log "  OCI layout:  $DEST/oci"
log "  oci-archive: $DEST/virt-launcher.oci.tar"
