#!/usr/bin/env bash
# Builds passt (and passt.avx2) from Debian's source tarball, sha256-pinned, into DEST_DIR:
#
#   scripts/build-passt.sh DEST_DIR        -> DEST_DIR/passt, DEST_DIR/passt.avx2
#   scripts/build-passt.sh --version       prints the pinned version
#   scripts/build-passt.sh --source        prints "<Debian's tarball URL>\t<sha256>"
#
# Why: Debian 12's passt (0.0~git20230309) has no --vhost-user, which libvirt 11 uses for
# KubeVirt >= 1.8's passtBinding; this is Debian 13's passt, built here. setup-host.sh installs
# it into /usr/local/bin (the host), build-image.sh into the image's /usr/bin (the pod).
# The binaries are stripped: no build path in them, the same source gives the same bytes with
# the same compiler. Needs: curl, sha256sum, tar with xz, make, a C compiler.
set -euo pipefail

PASST_VERSION=0.0~git20250503.587980c
PASST_SHA256=69d5eb843f7d648c2cc60bfbca6ea7b5014c6b6f07cdee362c2a8cf490515a49
PASST_PATH=pool/main/p/passt/passt_${PASST_VERSION}.orig.tar.xz
# Where it is recorded as coming from (the SBOM), and where it is downloaded (a mirror may
# stand in: VIRT_LAUNCHER_DEBIAN_URI; the sha256 is what makes it the same tarball).
PASST_SOURCE=http://deb.debian.org/debian/$PASST_PATH
PASST_URL="${VIRT_LAUNCHER_DEBIAN_URI:-http://deb.debian.org/debian}/$PASST_PATH"

die() {
    echo "build-passt: ERROR: $*" >&2
    exit 1
}

case "${1:-}" in
    --version)
        echo "$PASST_VERSION"
        exit 0
        ;;
    --source)
        printf '%s\t%s\n' "$PASST_SOURCE" "$PASST_SHA256"
        exit 0
        ;;
    '' | -*) die "usage: build-passt.sh DEST_DIR | --version | --source" ;;
esac
DEST=$1
for tool in curl sha256sum tar make cc strip; do
    command -v "$tool" >/dev/null || die "$tool not found (./devtool setup installs it)"
done

work=$(mktemp -d "${TMPDIR:-/tmp}/build-passt.XXXXXX")
trap 'rm -rf "$work"' EXIT
tarball="$work/passt.orig.tar.xz"
curl -fsS --retry 3 --max-time 300 -o "$tarball" "$PASST_URL" || die "cannot download $PASST_URL"
echo "$PASST_SHA256  $tarball" | sha256sum -c --quiet - >/dev/null 2>&1 ||
    die "$PASST_URL does not have the pinned sha256 $PASST_SHA256"
mkdir "$work/src"
tar -xJf "$tarball" -C "$work/src" --strip-components=1
# passt and passt.avx2 (passt runs the AVX2 build beside it when the CPU has AVX2).
# Two runs: make passes passt.avx2's -mavx2 on to its prerequisite passt otherwise.
{ make -C "$work/src" VERSION="$PASST_VERSION" passt &&
    make -C "$work/src" VERSION="$PASST_VERSION" passt.avx2; } >"$work/build.log" 2>&1 ||
    {
        cp "$work/build.log" /tmp/build-passt.log
        die "build failed (log: /tmp/build-passt.log)"
    }
mkdir -p "$DEST"
for b in passt passt.avx2; do
    strip -o "$work/$b.stripped" "$work/src/$b"
    install -m 0755 "$work/$b.stripped" "$DEST/$b"
done
"$DEST/passt" --help 2>&1 | grep -q -- --vhost-user || die "the built passt does not know --vhost-user"
