#!/usr/bin/env bash
# Build dist/meshd_<version>_all.deb (or <output-dir>/meshd_<version>_all.deb).
#
#   packaging/build-deb.sh [OUTPUT_DIR]
#
# The package ships the project's wheel in /usr/share/meshd; its postinst creates a venv in
# /opt/meshd and installs the wheel there (pip may fetch dependencies from the index at
# install time). /usr/bin/meshd and /usr/bin/meshctl link into the venv.
# Needs: python3 with pip (or $PYTHON, e.g. a venv's python), dpkg-deb. The source tree is
# copied before building, so the build leaves no build/ or *.egg-info behind in it.
set -euo pipefail
python=${PYTHON:-python3}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
out=${1:-"$root/dist"}
mkdir -p "$out"
out=$(cd "$out" && pwd)

version=$("$python" - "$root/pyproject.toml" <<'PY'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    print(tomllib.load(f)["project"]["version"])
PY
)
# Debian versions must start with a digit and use only these characters.
if ! [[ $version =~ ^[0-9][A-Za-z0-9.+~-]*$ ]]; then
    echo "error: version '$version' from pyproject.toml is not a valid Debian version" >&2
    exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Copy the source without VCS data, caches and earlier build output.
mkdir "$work/src"
tar -C "$root" \
    --exclude=./.git --exclude=./dist --exclude=./build --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude=.pytest_cache --exclude=.hypothesis \
    --exclude=.benchmarks --exclude=.venv \
    -cf - . | tar -C "$work/src" -xf -

"$python" -m pip wheel --quiet --disable-pip-version-check --no-deps \
    --wheel-dir "$work/wheel" "$work/src"
wheels=("$work"/wheel/meshd-*.whl)
if [[ ${#wheels[@]} -ne 1 || ! -f ${wheels[0]} ]]; then
    echo "error: expected one meshd wheel, found: ${wheels[*]}" >&2
    exit 1
fi
wheel_name=$(basename "${wheels[0]}")

pkg="$work/pkg"
install -D -m 0644 "${wheels[0]}" "$pkg/usr/share/meshd/$wheel_name"
install -D -m 0644 "$here/meshd.toml" "$pkg/etc/meshd/meshd.toml"
install -D -m 0644 "$here/meshd.service" "$pkg/lib/systemd/system/meshd.service"
mkdir -p "$pkg/usr/bin" "$pkg/DEBIAN"
ln -s /opt/meshd/bin/meshd "$pkg/usr/bin/meshd"
ln -s /opt/meshd/bin/meshctl "$pkg/usr/bin/meshctl"

installed_kib=$(du -sk "$pkg" | cut -f1)
cat > "$pkg/DEBIAN/control" <<CONTROL
Package: meshd
Version: $version
Architecture: all
Maintainer: ${MESHD_MAINTAINER:-meshd maintainers <meshd@example.org>}
Installed-Size: $installed_kib
Depends: python3 (>= 3.11), python3-venv
Section: admin
Priority: optional
Description: peer-to-peer orchestration daemon for edge sites
 meshd runs on every edge device. Devices on one LAN form a site that agrees
 on workload placement with Raft; sites exchange state with CRDTs and keep
 working while disconnected. Operators use meshctl over a local admin socket.
 .
 The Python package is installed into a virtual environment in /opt/meshd
 when the package is configured.
CONTROL

echo /etc/meshd/meshd.toml > "$pkg/DEBIAN/conffiles"

cat > "$pkg/DEBIAN/postinst" <<POSTINST
#!/bin/sh
set -e
if [ "\$1" = configure ]; then
    # The venv is not tracked by dpkg: postrm removes it.
    python3 -m venv /opt/meshd
    /opt/meshd/bin/pip install --quiet --disable-pip-version-check --no-input \\
        /usr/share/meshd/$wheel_name
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload || true
        # An upgrade restarts a running daemon; a fresh install does not start one, so
        # the operator can set site, name or a join token first:
        #   systemctl enable --now meshd
        systemctl try-restart meshd.service || true
    fi
fi
exit 0
POSTINST

cat > "$pkg/DEBIAN/prerm" <<'PRERM'
#!/bin/sh
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    systemctl stop meshd.service || true
fi
exit 0
PRERM

cat > "$pkg/DEBIAN/postrm" <<'POSTRM'
#!/bin/sh
set -e
case "$1" in
    remove|purge)
        rm -rf /opt/meshd
        if [ -d /run/systemd/system ]; then
            systemctl disable meshd.service >/dev/null 2>&1 || true
            systemctl daemon-reload || true
        fi
        ;;
esac
if [ "$1" = purge ]; then
    # Purging forgets this node: identity keys, Raft journal, CRDT store, logs.
    rm -rf /var/lib/meshd /etc/meshd
fi
exit 0
POSTRM
chmod 0755 "$pkg/DEBIAN/postinst" "$pkg/DEBIAN/prerm" "$pkg/DEBIAN/postrm"

deb="$out/meshd_${version}_all.deb"
dpkg-deb --root-owner-group -Zxz --build "$pkg" "$deb" >/dev/null
echo "$deb"
