"""Run commands in your own container image, or in a recipe, instead of capsa's Debian root.

    docker save alpine:3.20 -o alpine.tar        # or: podman save, or an OCI layout (dir or tar)
    .venv/bin/python examples/custom_image.py alpine.tar cat /etc/os-release
    .venv/bin/python examples/custom_image.py --recipe    # a recipe on capsa's Debian base

Without an archive the example writes a tiny busybox-only image itself (from the host's static
/bin/busybox), so it runs offline. The image is imported once (layers merged, digests checked,
squashed read-only) and cached by content; the first sandbox of an image records a template, so
later ones restore in a fraction of a second. The image needs no Python: capsa's agent keeps its
own root and runs your commands inside the image's.

``--recipe`` builds ``capsa.Image.debian()`` with a copied directory, a ``run()`` step (in a build VM),
an env variable and a workdir, each step a cached layer (a second run finds them all cached), and
warms the template with ``warmup()``.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import sys
import tarfile
import tempfile
from pathlib import Path

import capsa


def busybox_archive(directory: Path) -> Path:
    """A one-layer ``docker save``-style archive holding only a static busybox."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        tar.add("/bin/busybox", arcname="bin/busybox")
        for applet in ("sh", "cat", "ls", "id", "uname"):
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname, link.mode = tarfile.SYMTYPE, "busybox", 0o777
            tar.addfile(link)
        release = b'PRETTY_NAME="busybox example image"\n'
        info = tarfile.TarInfo("etc/os-release")
        info.size = len(release)
        tar.addfile(info, io.BytesIO(release))
    data = layer.getvalue()
    config = {
        "config": {"Env": ["PATH=/bin", "GREETING=hello"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(data).hexdigest()]},
    }
    manifest = [{"Config": "config.json", "RepoTags": ["busybox:example"], "Layers": ["l/layer.tar"]}]
    path = directory / "busybox.tar"
    with tarfile.open(path, "w") as tar:
        for name, body in (
            ("l/layer.tar", data),
            ("config.json", json.dumps(config).encode()),
            ("manifest.json", json.dumps(manifest).encode()),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return path


async def run_in_image(archive: Path, argv: list[str]) -> capsa.ExecResult:
    image = capsa.Image.from_oci(archive)
    async with await capsa.sandbox().image(image).memory_mb(256).build() as vm:
        info = await vm.agent.info()
        sys.stderr.write(f"sandbox on image {info.image!r}\n")
        return await vm.agent.exec(argv[0]).args(argv[1:]).timeout(60).run()


async def run_recipe(directory: Path) -> capsa.ExecResult:
    app = directory / "app"
    app.mkdir()
    (app / "main.py").write_text("import os\nprint('hello from', os.getcwd(), os.environ['APP_MODE'])\n")
    image = (
        capsa.Image.debian(name="example-recipe", context=directory)
        .copy(app, "/opt/app")  # the directory's contents land at /opt/app
        .run("python3 -m compileall -q /opt/app")  # in a build VM; its changes become a layer
        .env("APP_MODE", "example")
        .workdir("/opt/app")
    )
    image.build(progress=lambda line: sys.stderr.write(f"  {line}\n"))  # or let build() do it
    builder = capsa.sandbox().image(image).memory_mb(384).warmup("python3 -c 'import json'")
    async with await builder.build() as vm:
        return await vm.agent.exec("python3").arg("main.py").timeout(60).run()


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        if sys.argv[1:] == ["--recipe"]:
            job = run_recipe(Path(tmp))
        elif len(sys.argv) > 1:
            job = run_in_image(Path(sys.argv[1]), sys.argv[2:] or ["cat", "/etc/os-release"])
        else:
            job = run_in_image(busybox_archive(Path(tmp)), ["cat", "/etc/os-release"])
        try:
            result = asyncio.run(job)
        except capsa.ImageError as exc:
            sys.stderr.write(f"cannot use the image: {exc}\n")
            return 2
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
