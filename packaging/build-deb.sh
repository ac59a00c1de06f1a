#!/usr/bin/env bash
# Build a self-contained meshd package for one architecture:
#
#   packaging/build-deb.sh [--arch ARCH] [OUTPUT_DIR]     -> OUTPUT_DIR/meshd_<version>_<arch>.deb
#
# The package carries everything meshd runs on but the Python interpreter: a virtual
# environment in /opt/meshd holding meshd and exactly the dependency versions of
# packaging/requirements.lock, installed and byte-compiled here, at build time. Installing it
# needs no network and runs no pip; it depends on Debian's python3.X (the build Python's
# version: 3.11 on Debian 12 and Raspberry Pi OS 12) and a libc as new as its compiled
# wheels need. /usr/bin/meshd and /usr/bin/meshctl link into the environment, and
# /usr/share/meshd/DIGEST holds the build's attestation reference digest (what `meshd digest`
# prints for the package, and what the installed node's evidence will claim).
#
# ARCH defaults to this machine's (dpkg --print-architecture). amd64 and arm64 can be built on
# either: the other's dependencies are then taken as its prebuilt wheels (PyPI has them for
# every compiled dependency), and a dependency with no such wheel must be pure Python.
# Needs: python3 with pip (or $PYTHON, e.g. a venv's python; the package's Python version is
# its version), dpkg-deb; the package index, or a pip cache or --find-links that holds the
# locked versions. The source tree is copied first: the build leaves nothing behind in it.
set -euo pipefail
python=${PYTHON:-python3}

usage() { echo "usage: $0 [--arch amd64|arm64|...] [OUTPUT_DIR]" >&2; exit 2; }
arch=""
out=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --arch) [[ $# -ge 2 ]] || usage; arch=$2; shift 2 ;;
        --arch=*) arch=${1#--arch=}; shift ;;
        -h|--help) usage ;;
        -*) echo "error: unknown option $1" >&2; usage ;;
        *) [[ -z $out ]] || usage; out=$1; shift ;;
    esac
done

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
out=${out:-"$root/dist"}
mkdir -p "$out"
out=$(cd "$out" && pwd)
lock="$here/requirements.lock"

native=$(dpkg --print-architecture)
arch=${arch:-$native}
# Debian architecture -> the machine name in wheel platform tags.
case "$arch" in
    amd64) machine=x86_64 ;;
    arm64) machine=aarch64 ;;
    *) machine="" ;;
esac
cross=()
if [[ $arch != "$native" ]]; then
    if [[ -z $machine ]]; then
        echo "error: cannot build for $arch on $native (amd64 and arm64 packages can be built anywhere;" \
             "build a $arch package on a $arch machine)" >&2
        exit 1
    fi
    pyabi=$("$python" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
    pynum=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    # The manylinux tags a Debian 12 (glibc 2.36) device takes, newest first.
    cross=(--platform "manylinux_2_36_$machine" --platform "manylinux_2_28_$machine"
           --platform "manylinux_2_17_$machine" --platform "manylinux2014_$machine"
           --implementation cp --python-version "$pynum" --abi "$pyabi" --abi abi3 --abi none)
fi

pyver=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
interpreter=/usr/bin/python$pyver  # Debian's python3.X package puts it here
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
pip=("$python" -m pip --disable-pip-version-check --no-input)

# Copy the source without VCS data, caches and earlier build output.
mkdir "$work/src"
tar -C "$root" \
    --exclude=./.git --exclude=./dist --exclude=./build --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude=.pytest_cache --exclude=.hypothesis \
    --exclude=.benchmarks --exclude=.venv \
    -cf - . | tar -C "$work/src" -xf -

echo "building the meshd wheel" >&2
"${pip[@]}" wheel --quiet --no-deps --wheel-dir "$work/wheels" "$work/src"
meshd_wheels=("$work"/wheels/meshd-*.whl)
if [[ ${#meshd_wheels[@]} -ne 1 || ! -f ${meshd_wheels[0]} ]]; then
    echo "error: expected one meshd wheel, found: ${meshd_wheels[*]}" >&2
    exit 1
fi

echo "collecting the locked dependencies for $arch" >&2
if [[ ${#cross[@]} -eq 0 ]]; then
    "${pip[@]}" wheel --quiet --no-deps --wheel-dir "$work/wheels" -r "$lock"
else
    "${pip[@]}" download --quiet --no-deps "${cross[@]}" --dest "$work/download" -r "$lock"
    for f in "$work"/download/*; do
        case "$f" in
            *.whl) mv "$f" "$work/wheels/" ;;
            *) "${pip[@]}" wheel --quiet --no-deps --wheel-dir "$work/wheels" "$f" ;;
        esac
    done
fi
# Every wheel must run on $arch: pure Python, or built for its machine.
for f in "$work"/wheels/*.whl; do
    name=$(basename "$f" .whl)
    platform=${name##*-}
    if [[ $platform != any && $platform != *"${machine:-$(uname -m)}"* ]]; then
        echo "error: $(basename "$f") is built for $platform, not $arch: it has no $arch wheel on the" \
             "index and is not pure Python; build the package on a $arch machine" >&2
        exit 1
    fi
done

pkg="$work/pkg"
venv="$pkg/opt/meshd"
site="$venv/lib/python$pyver/site-packages"
echo "installing into /opt/meshd" >&2
"${pip[@]}" install --quiet --no-deps --no-index --no-compile --no-warn-script-location --root-user-action=ignore "${cross[@]}" \
    --target "$site" "$work"/wheels/*.whl
rm -rf "$site/bin"  # console scripts pip wrote for the build's path; the real ones follow

# The virtual environment around site-packages, pointing at the device's interpreter.
mkdir -p "$venv/bin"
ln -s "$interpreter" "$venv/bin/python$pyver"
ln -s "python$pyver" "$venv/bin/python3"
ln -s "python$pyver" "$venv/bin/python"
full_version=$("$python" -c 'import platform; print(platform.python_version())')
cat > "$venv/pyvenv.cfg" <<CFG
home = $(dirname "$interpreter")
include-system-site-packages = false
version = $full_version
CFG
# meshd's commands, from its wheel's entry points. -I: the daemon runs as root, so neither
# PYTHON* variables nor a user's site-packages may change what it imports.
"$python" - "$site" "$venv/bin" "/opt/meshd/bin/python$pyver" <<'PY'
import configparser, glob, os, sys
site, bindir, python = sys.argv[1:]
(entry_points,) = glob.glob(os.path.join(site, "meshd-*.dist-info", "entry_points.txt"))
parser = configparser.ConfigParser()
parser.read(entry_points)
for name, target in parser["console_scripts"].items():
    module, _, function = target.partition(":")
    path = os.path.join(bindir, name)
    with open(path, "w") as f:
        f.write(f"#!{python} -I\nimport sys\nfrom {module} import {function}\nsys.exit({function}())\n")
    os.chmod(path, 0o755)
PY

# Byte-compile at build time: the installed tree is read-only to the daemon (the unit's
# ProtectSystem=strict), and dpkg then owns the caches and removes them with the package.
"$python" -m compileall -q -j 0 -s "$pkg" -p / "$venv/lib" >/dev/null

# The reference digest of the code this package installs, read by meshd's own reader (which
# imports nothing compiled, so it reads another architecture's tree too).
digest=$(PYTHONPATH="$work/src" "$python" -c \
    'import sys; from meshd.io.builddigest import digest_build; print(digest_build(sys.argv[1]).digest)' "$site")
install -D -m 0644 /dev/null "$pkg/usr/share/meshd/DIGEST"
echo "$digest" > "$pkg/usr/share/meshd/DIGEST"
install -D -m 0644 "$lock" "$pkg/usr/share/meshd/requirements.lock"

install -D -m 0644 "$here/meshd.toml" "$pkg/etc/meshd/meshd.toml"
install -D -m 0644 "$here/meshd.service" "$pkg/lib/systemd/system/meshd.service"
mkdir -p "$pkg/usr/bin" "$pkg/DEBIAN"
ln -s /opt/meshd/bin/meshd "$pkg/usr/bin/meshd"
ln -s /opt/meshd/bin/meshctl "$pkg/usr/bin/meshctl"

# The newest glibc any compiled wheel needs: each wheel needs the oldest of its manylinux tags.
glibc=$("$python" - "$site" <<'PY'
import glob, os, re, sys
LEGACY = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}
need = (2, 17)
for wheel in glob.glob(os.path.join(sys.argv[1], "*.dist-info", "WHEEL")):
    found = []
    for line in open(wheel):
        if line.startswith("Tag:"):
            platform = line.split("-")[-1].strip()
            if m := re.match(r"manylinux_(\d+)_(\d+)_", platform):
                found.append((int(m[1]), int(m[2])))
            elif m := re.match(r"(manylinux\w+?)_", platform):
                found.append(LEGACY.get(m[1], (2, 17)))
    if found:
        need = max(need, min(found))
print("%d.%d" % need)
PY
)

installed_kib=$(du -sk "$pkg" | cut -f1)
cat > "$pkg/DEBIAN/control" <<CONTROL
Package: meshd
Version: $version
Architecture: $arch
Maintainer: ${MESHD_MAINTAINER:-meshd maintainers <meshd@example.org>}
Installed-Size: $installed_kib
Depends: python$pyver, libc6 (>= $glibc)
Section: admin
Priority: optional
Description: peer-to-peer orchestration daemon for edge sites
 meshd runs on every edge device. Devices on one LAN form a site that agrees
 on workload placement with Raft; sites exchange state with CRDTs and keep
 working while disconnected. Operators use meshctl over a local admin socket.
 .
 Self-contained: meshd and its dependencies are in /opt/meshd, installed
 when the package was built; installing it needs no network.
CONTROL

echo /etc/meshd/meshd.toml > "$pkg/DEBIAN/conffiles"

# DPKG_ROOT is set when the package is installed into another root (dpkg --root with
# --force-script-chrootless): the systemd of this machine is then none of its business.
cat > "$pkg/DEBIAN/postinst" <<POSTINST
#!/bin/sh
set -e
if [ "\$1" = configure ]; then
    if [ ! -x "\${DPKG_ROOT:-}$interpreter" ]; then
        echo "meshd: $interpreter is missing (install python$pyver)" >&2
        exit 1
    fi
    # Workloads run as this unprivileged user unless their spec names another (workload-user).
    if [ -z "\${DPKG_ROOT:-}" ] && ! getent passwd meshd-workload >/dev/null; then
        adduser --system --group --no-create-home --home /nonexistent --quiet meshd-workload 2>/dev/null \
            || useradd --system --user-group --no-create-home --home-dir /nonexistent \
                   --shell /usr/sbin/nologin meshd-workload
    fi
    if [ -z "\${DPKG_ROOT:-}" ] && [ -d /run/systemd/system ]; then
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
if [ "$1" = remove ] && [ -z "${DPKG_ROOT:-}" ] && [ -d /run/systemd/system ]; then
    systemctl stop meshd.service || true
fi
exit 0
PRERM

cat > "$pkg/DEBIAN/postrm" <<'POSTRM'
#!/bin/sh
set -e
case "$1" in
    remove|purge)
        # dpkg has removed its files; this takes what Python may have added since.
        rm -rf "${DPKG_ROOT:-}/opt/meshd"
        if [ -z "${DPKG_ROOT:-}" ] && [ -d /run/systemd/system ]; then
            systemctl disable meshd.service >/dev/null 2>&1 || true
            systemctl daemon-reload || true
        fi
        ;;
esac
if [ "$1" = purge ]; then
    # Purging forgets this node: identity keys, Raft journal, CRDT store, logs.
    rm -rf "${DPKG_ROOT:-}/var/lib/meshd" "${DPKG_ROOT:-}/etc/meshd"
fi
exit 0
POSTRM
chmod 0755 "$pkg/DEBIAN/postinst" "$pkg/DEBIAN/prerm" "$pkg/DEBIAN/postrm"

deb="$out/meshd_${version}_${arch}.deb"
echo "packing $(basename "$deb")" >&2
dpkg-deb --root-owner-group -Zxz --build "$pkg" "$deb" >/dev/null
echo "$deb"
