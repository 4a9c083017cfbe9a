#!/usr/bin/env bash
# One-shot setup on Debian/Ubuntu: system packages, a virtualenv with capsa, and the guest images.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

echo "==> system packages (QEMU, busybox-static, Python venv)"
$SUDO apt-get update -q
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    qemu-system-x86 qemu-utils busybox-static mmdebstrap squashfs-tools-ng \
    python3 python3-venv ca-certificates

echo "==> virtualenv in .venv"
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/pip install -q --disable-pip-version-check -e '.[dev]'

echo "==> guest images (Debian kernel, busybox raw-VM guest, sandbox rootfs), cached in ~/.cache/capsa"
.venv/bin/capsa image busybox
.venv/bin/capsa image build

echo "==> done. Run the tests with: .venv/bin/pytest"
