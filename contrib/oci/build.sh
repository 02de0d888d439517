#!/usr/bin/env bash
# Builds the seaport image as an OCI image layout, the way distroless builds
# its own: from Debian packages, without pulling any image and without Docker.
#
#   contrib/oci/build.sh OUT            # writes the layout OUT, tag `latest`
#   contrib/oci/build.sh --bin DIR OUT  # take the binaries from DIR, build nothing
#
# One image holds the four binaries in /usr/local/bin (seaport-seed,
# seaport-registry, seaport-service, seaport-proxy), on the files of the
# Debian 12 packages that gcr.io/distroless/cc-debian12 is made of: libc6,
# libgcc-s1, base-files, netbase, tzdata and ca-certificates (fetched with
# `apt-get download`, unpacked with `dpkg-deb -x`: no maintainer script runs,
# and there is no shell, no dpkg and no apt in the image). The image config
# is the one the Dockerfile gives: user 65532:65532 (`nonroot`), working
# directory /home/nonroot, no entrypoint, `seaport-registry --help` as the
# default command, so `docker run IMAGE seaport-seed` and a runtime's
# `args` pick the binary. Nothing in the image needs to write: run it with a
# read-only root filesystem (`docker run --read-only`, `root.readonly` for
# runc), and hand seeds in as read-only files (contrib/oci/walkthrough.sh).
#
# Two layers: the Debian files (the same digest from one build to the next
# while the packages do not change) and the binaries. Files, owners and
# mtimes (SOURCE_DATE_EPOCH, default: the last commit's time) are fixed, so
# the same packages and binaries give the same digests.
#
# Dropped from the packages (nothing here reads them): /usr/share/doc except
# each package's copyright, /usr/share/{man,info,lintian,base-files},
# /etc/update-motd.d (a shell script), ca-certificates' update script and
# its single certificates (the bundle /etc/ssl/certs/ca-certificates.crt,
# which its postinst would make, is made here instead, as distroless does),
# and glibc's iconv modules (/usr/lib/x86_64-linux-gnu/gconv, 8 MB: Rust's
# std never calls iconv). Added, as in distroless: /etc/passwd and
# /etc/group (root, nobody, nonroot 65532), /etc/nsswitch.conf,
# /home/nonroot (0700, 65532), /tmp (1777), and each package's control
# fields in /var/lib/dpkg/status.d/ for image scanners. / is merged-/usr, as
# in Debian 12.
#
# Needs root (files owned by root and 65532), apt-get and dpkg-deb (a Debian
# 12 host: the packages come from its apt sources), umoci, python3, and
# cargo unless --bin is given. Prints the layers' compressed sizes.
set -euo pipefail
# The image's files get their modes from here, whatever the caller's umask.
umask 022
CALLER=$PWD
cd "$(dirname "$0")/../.."
ROOT=$PWD

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; }

BIN="" OUT=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --bin) BIN="${2:?--bin DIR}"; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "build.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
        *) [[ -z "$OUT" ]] || { echo "build.sh: one OUT only" >&2; exit 2; }; OUT="$1" ;;
    esac
    shift
done
[[ -n "$OUT" ]] || { usage >&2; exit 2; }
# Relative paths are the caller's, not the repository's.
[[ "$OUT" == /* ]] || OUT="$CALLER/$OUT"
[[ -z "$BIN" || "$BIN" == /* ]] || BIN="$CALLER/$BIN"
[[ $(id -u) -eq 0 ]] || { echo "build.sh: needs root (the image's files belong to root and to uid 65532)" >&2; exit 1; }
for tool in umoci apt-get dpkg-deb python3; do
    command -v "$tool" >/dev/null || { echo "build.sh: $tool is missing (apt-get install -y umoci)" >&2; exit 1; }
done
if [[ -e "$OUT" ]]; then
    # Replace an earlier layout, never anything else.
    if [[ -f "$OUT/oci-layout" ]] || [[ -d "$OUT" && -z "$(ls -A "$OUT")" ]]; then
        rm -rf "$OUT"
    else
        echo "build.sh: $OUT exists and is not an OCI layout: not replacing it" >&2; exit 1
    fi
fi

BINARIES=(seaport-seed seaport-registry seaport-service seaport-proxy)
PACKAGES=(libc6 libgcc-s1 base-files netbase tzdata ca-certificates)
ARCH=amd64 MULTIARCH=x86_64-linux-gnu
[[ "$(dpkg --print-architecture)" == "$ARCH" ]] || { echo "build.sh: builds the amd64 image only" >&2; exit 1; }
if ! grep -q '^VERSION_CODENAME=bookworm' /etc/os-release; then
    echo "build.sh: warning: not a Debian 12 (bookworm) host: the packages are this host's, not cc-debian12's" >&2
fi

# The image's config, which the Dockerfile gives too (contrib/oci/check-dockerfile.py).
USER_SPEC=65532:65532
WORKDIR=/home/nonroot
ENV_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
ENV_CERTS=/etc/ssl/certs/ca-certificates.crt
CMD=(seaport-registry --help)

EPOCH="${SOURCE_DATE_EPOCH:-$(git -C "$ROOT" log -1 --format=%ct 2>/dev/null || echo 0)}"
CREATED="$(date -u -d "@$EPOCH" +%Y-%m-%dT%H:%M:%SZ)"

START=$SECONDS
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# ---- the binaries ------------------------------------------------------------------------
if [[ -z "$BIN" ]]; then
    BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
    echo "build.sh: cargo build --release (a no-op when the binaries are fresh)" >&2
    # The same package set as the Dockerfile and scripts/demo.sh, so that one
    # build serves all three (another set would unify features differently
    # and rebuild).
    cargo build --release --locked -q -p seaport-seed -p seaport-registry -p seaport-service -p seaport-proxy
fi
for b in "${BINARIES[@]}"; do
    [[ -x "$BIN/$b" ]] || { echo "build.sh: no $BIN/$b" >&2; exit 1; }
done
VERSION="$("$BIN/seaport-registry" --version | awk '{ print $2 }')"

# ---- the Debian packages -----------------------------------------------------------------
mkdir -p "$work/debs"
download() {
    (cd "$work/debs" && apt-get download -q -o APT::Sandbox::User=root "${PACKAGES[@]}" >/dev/null)
}
if ! download 2>"$work/apt.err"; then
    echo "build.sh: apt-get download failed; apt-get update and again" >&2
    apt-get update -qq
    download
fi
base="$work/base"      # layer 1: the Debian files and the accounts
mkdir -p "$base/var/lib/dpkg/status.d"
for p in "${PACKAGES[@]}"; do
    deb=("$work/debs/${p}_"*.deb)
    [[ -f "${deb[0]}" ]] || { echo "build.sh: $p was not downloaded" >&2; exit 1; }
    dpkg-deb -x "${deb[0]}" "$base"
    dpkg-deb -f "${deb[0]}" > "$base/var/lib/dpkg/status.d/$p"
    printf '%s %s\n' "$p" "$(dpkg-deb -f "${deb[0]}" Version)" >> "$work/versions"
done

cd "$base"
# What nothing in the image reads (see the top of this file).
find usr/share/doc -mindepth 2 ! -name copyright ! -type d -delete
find usr/share/doc -type l -delete
rm -rf usr/share/man usr/share/info usr/share/lintian usr/share/base-files \
       etc/update-motd.d usr/sbin/update-ca-certificates \
       usr/share/doc/ca-certificates/examples \
       "usr/lib/$MULTIARCH/gconv"
# The certificate bundle update-ca-certificates would write: every
# certificate the package ships (all enabled by default), in name order.
mkdir -p etc/ssl/certs
LC_ALL=C python3 - usr/share/ca-certificates etc/ssl/certs/ca-certificates.crt <<'EOF'
import pathlib, sys
src, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
certs = sorted(p for p in src.rglob("*.crt"))
if not certs:
    sys.exit("build.sh: no certificate in ca-certificates")
text = "".join(p.read_text() if p.read_text().endswith("\n") else p.read_text() + "\n" for p in certs)
out.write_text(text)
print(f"build.sh: {len(certs)} certificates in /{out}", file=sys.stderr)
EOF
rm -rf usr/share/ca-certificates
# The accounts, as in distroless.
cat > etc/passwd <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
cat > etc/group <<'EOF'
root:x:0:
nobody:x:65534:
tty:x:5:
staff:x:50:
nonroot:x:65532:
EOF
cat > etc/nsswitch.conf <<'EOF'
passwd:         files
group:          files
shadow:         files
hosts:          files dns
networks:       files
protocols:      files
services:       files
ethers:         files
rpc:            files
EOF
chmod 0644 etc/passwd etc/group etc/nsswitch.conf
mkdir -p home/nonroot root tmp
chown 65532:65532 home/nonroot
chmod 0700 home/nonroot root
chmod 1777 tmp
# Merged /usr, as on Debian 12 (the packages still ship /lib and /lib64).
for d in bin sbin lib lib64; do
    if [[ -d "$d" && ! -L "$d" ]]; then
        mkdir -p "usr/$d"
        cp -a "$d/." "usr/$d/"
        rm -rf "$d"
    fi
    ln -s "usr/$d" "$d"
done
# No shell and no package manager, whatever the packages bring.
for banned in bin/sh bin/bash bin/dash usr/bin/dpkg usr/bin/apt usr/bin/apt-get; do
    [[ ! -e "usr/$banned" && ! -e "$banned" ]] || { echo "build.sh: /$banned is in the image" >&2; exit 1; }
done
cd "$ROOT"

apps="$work/apps"      # layer 2: the binaries
mkdir -p "$apps/usr/local/bin"
for b in "${BINARIES[@]}"; do
    install -m 0755 -o root -g root "$BIN/$b" "$apps/usr/local/bin/$b"
done

# Every file root's but /home/nonroot; fixed mtimes.
chown -R root:root "$apps"
find "$base" "$apps" -exec touch -h -d "@$EPOCH" {} +

# ---- it runs: each binary in the assembled root, as nonroot ---------------------------
check="$work/check"
mkdir -p "$check"
cp -a "$base/." "$check/"
cp -a "$apps/." "$check/"
for b in "${BINARIES[@]}"; do
    chroot --userspec="$USER_SPEC" "$check" "/usr/local/bin/$b" --version >/dev/null \
        || { echo "build.sh: $b does not run in the image's root (a library missing?)" >&2; exit 1; }
done
rm -rf "$check"

# ---- the OCI layout ----------------------------------------------------------------------
IMG="$OUT:latest"
# unpack/repack rather than `umoci insert`: umoci 0.4.7's insert leaves the
# layer's tar without its end (umoci #436, fixed after Debian 12's version),
# which GNU tar and image scanners reject.
umoci init --layout "$OUT"
umoci new --image "$IMG"
umoci unpack --image "$IMG" "$work/bundle"
layer() {   # layer DIR TEXT: DIR's files as one more layer
    cp -a "$1/." "$work/bundle/rootfs/"
    touch -h -d "@$EPOCH" "$work/bundle/rootfs"
    umoci repack --refresh-bundle --image "$IMG" --history.created "$CREATED" \
        --history.created_by "contrib/oci/build.sh: $2" "$work/bundle"
}
layer "$base" "Debian 12 packages $(paste -sd, "$work/versions" | sed 's/,/, /g')"
layer "$apps" "${BINARIES[*]} $VERSION"
cmd_args=()
for c in "${CMD[@]}"; do cmd_args+=(--config.cmd "$c"); done
umoci config --image "$IMG" --created "$CREATED" --history.created "$CREATED" \
    --history.created_by "contrib/oci/build.sh: config" \
    --config.user "$USER_SPEC" --config.workingdir "$WORKDIR" \
    --config.env "PATH=$ENV_PATH" --config.env "SSL_CERT_FILE=$ENV_CERTS" \
    "${cmd_args[@]}" \
    --config.label "org.opencontainers.image.title=seaport" \
    --config.label "org.opencontainers.image.version=$VERSION"
umoci gc --layout "$OUT"
chmod -R a+rX "$OUT"

# ---- what it weighs ----------------------------------------------------------------------
python3 - "$OUT" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
blob = lambda d: out / "blobs" / d.split(":")[0] / d.split(":")[1]
index = json.loads((out / "index.json").read_text())
manifest = json.loads(blob(index["manifests"][0]["digest"]).read_text())
names = ["Debian files", "seaport binaries"]
total = 0
for name, layer in zip(names, manifest["layers"]):
    total += layer["size"]
    print(f"  layer {name:<17} {layer['size']/1e6:6.2f} MB compressed  {layer['digest'][:19]}", file=sys.stderr)
meta = manifest["config"]["size"] + index["manifests"][0]["size"]
print(f"  image total             {(total+meta)/1e6:6.2f} MB (layers, config and manifest)", file=sys.stderr)
EOF
python3 "$ROOT/contrib/oci/check-dockerfile.py" "$OUT"
echo "build.sh: wrote $OUT (tag latest) in $((SECONDS - START)) s" >&2
