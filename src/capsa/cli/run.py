"""``capsa run``: boot a raw VM and attach the terminal to its serial console."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from typing import Any

import capsa
from capsa.cli._network import add_network_arguments, network_from_args
from capsa.cli._terminal import raw_terminal, stdin_chunks
from capsa.cli.exec import parse_memory, parse_share
from capsa.errors import ConfigError, VMNotRunning

DETACH = b"\x1d"  # Ctrl-]


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "run",
        help="boot a raw VM (your kernel/initrd, or a UEFI disk) attached to the terminal",
        description=(
            "Boot a raw VM and attach this terminal to its serial console (raw mode). Ctrl-] "
            "detaches and stops the VM, like telnet or virsh console. With --no-console, wait for "
            "the guest to power off. The exit status is 0 when the guest powered off by itself."
        ),
        epilog=(
            "examples:\n"
            "  capsa run --kernel vmlinuz --initrd initrd.img\n"
            "  capsa run --kernel vmlinuz --root-disk rootfs.img --cmdline 'init=/bin/sh'\n"
            "  capsa run --kernel vmlinuz --initrd initrd.img --share ./data:/data:rw --no-console\n"
            "  capsa run --kernel vmlinuz --initrd initrd.img --forward 8080:80   # NIC set up by DHCP\n"
            "  capsa run --uefi disk.img                  # OVMF; the image is opened copy-on-write\n"
            "  capsa run --uefi disk.qcow2 --uefi-vars my-vars.fd --uefi-writable"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    boot = parser.add_mutually_exclusive_group(required=True)
    boot.add_argument("--kernel", help="kernel image (bzImage or vmlinux)")
    boot.add_argument("--uefi", metavar="DISK", help="boot this disk (GPT + ESP) through OVMF")
    parser.add_argument("--uefi-vars", metavar="PATH", help="with --uefi: persistent variable store")
    parser.add_argument(
        "--uefi-writable", action="store_true", help="with --uefi: let the guest write to DISK"
    )
    parser.add_argument("--secure-boot", action="store_true", help="with --uefi: Secure Boot firmware")
    parser.add_argument("--initrd", help="initramfs")
    parser.add_argument("--root-disk", help="root disk image (/dev/vda, root=/dev/vda)")
    parser.add_argument("--disk", action="append", default=[], metavar="PATH[:ro]", help="extra disk")
    parser.add_argument("--cpus", type=int, default=1)
    parser.add_argument("--memory", default="512M", help="e.g. 512M or 1G")
    parser.add_argument("--cmdline", default="", help="extra kernel arguments, 'k=v flag ...'")
    parser.add_argument("--share", action="append", default=[], metavar="HOST:GUEST[:ro|rw]")
    add_network_arguments(parser, secrets=False)
    parser.add_argument("--no-console", action="store_true", help="do not attach; wait for power-off")
    parser.add_argument("--timeout", type=float, help="with --no-console: stop after this many seconds")
    parser.set_defaults(handler=_run)


def _boot(args: argparse.Namespace) -> capsa.LinuxDirectBoot | capsa.UefiBoot:
    if args.uefi is None:
        if args.uefi_vars or args.uefi_writable or args.secure_boot:
            raise ConfigError("--uefi-vars, --uefi-writable and --secure-boot need --uefi DISK")
        boot = capsa.LinuxDirectBoot(args.kernel, args.initrd)
        return boot.with_root_disk(args.root_disk) if args.root_disk else boot
    if args.initrd or args.root_disk or args.cmdline:
        raise ConfigError(
            "--uefi boots the disk's own loader: --initrd, --root-disk and --cmdline do not apply",
            hint="capsa.image.uefi_disk() builds a UEFI disk from a kernel, initrd and command line",
        )
    return capsa.UefiBoot(
        args.uefi, vars=args.uefi_vars, writable=args.uefi_writable, secure_boot=args.secure_boot
    )


def _builder(args: argparse.Namespace) -> capsa.VMBuilder:
    builder = capsa.vm(_boot(args)).cpus(args.cpus).memory_mb(parse_memory(args.memory))
    for item in args.disk:
        path, _, flag = item.partition(":")
        if flag not in ("", "ro"):
            raise ConfigError(f"--disk takes PATH[:ro], got {item!r}")
        builder = builder.disk(path, read_only=flag == "ro")
    for word in args.cmdline.split():
        key, sep, value = word.partition("=")
        builder = builder.cmdline_arg(key, value) if sep else builder.cmdline_flag(key)
    for item in args.share:
        host, guest, mode = parse_share(item)
        builder = builder.share(host, guest, mode)
    network = network_from_args(args)
    if network is not None:  # the guest configures eth0 by DHCP (e.g. udhcpc -i eth0)
        builder = builder.network(network)
    return builder


def _run(args: argparse.Namespace) -> int:
    return asyncio.run(_main(args))


async def _main(args: argparse.Namespace) -> int:
    vm = await _builder(args).build()
    try:
        if args.no_console:
            try:
                code = await vm.wait(args.timeout)
            except capsa.CapsaTimeoutError:
                sys.stderr.write(
                    f"capsa: the guest was still running after {args.timeout}s; stopped it\n"
                )
                return 124
            return 0 if code == 0 else 1
        return await _attach(vm)
    finally:
        await vm.stop()


async def _attach(vm: capsa.VM) -> int:
    if sys.stdin.isatty():
        sys.stderr.write("capsa: attached to the console; Ctrl-] detaches and stops the VM\r\n")
    typed = stdin_chunks("capsa-console-in")
    out = sys.stdout.buffer
    with raw_terminal():
        while True:
            text = await vm.console.read_available(0.05)
            if text:
                out.write(text.encode())
                out.flush()
            elif vm.exit_code is not None:  # the guest powered off (or QEMU died)
                return 0 if vm.exit_code == 0 else 1
            while not typed.empty():
                chunk = typed.get_nowait()
                if not chunk:
                    continue  # stdin closed: keep showing output until the guest ends
                with contextlib.suppress(VMNotRunning):
                    if DETACH in chunk:
                        await vm.console.write(chunk.split(DETACH, 1)[0])
                        return 0
                    await vm.console.write(chunk)
