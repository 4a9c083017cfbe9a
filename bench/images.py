"""User images (``capsa.Image``): build and import costs, side by side in one run.

Parts (``--only``, comma-separated; default: all):

- ``oci``: importing a ~100 MiB container image (``Image.from_oci``) vs ``tar2sqfs`` on the merged tar
  alone (goal <= 1.5x), for a Docker archive (plain layer tars) and an OCI layout (gzip layers).
  The image is the files of capsa's own Debian rootfs, cut at 100 MiB of data, split into a base
  layer and a top layer with a whiteout; written once under ``<cache>/bench/oci/``.

- ``start``: ``build()`` -> first exec for a recipe image restored from its template vs capsa's
  default image restored from its template (goal <= 1.2x). The recipe (a wheel, a copied tree, a
  ``run()``, env, workdir) is built once and cached.
- ``rebuild``: a recipe built from scratch (the issue's shape: ``apt_install("jq")`` from the
  host's Debian mirror unless ``--no-apt``, wheels, a copied tree, a ``run()``, env, then a last
  step) vs the rebuild after changing its last step (goal <= 0.2x): once with a ``workdir`` as the
  last step (no VM), once with a ``run()`` (a build VM boot). Both images are removed afterwards.

    .venv/bin/python -m bench.images [--only oci,start,rebuild] [--runs 3]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import resource
import shutil
import statistics
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench._report import figure, header
from capsa.runtime import cache_dir

# ---------------------------------------------------------------------------------------------
# oci: import speed


OCI_DATA_BYTES = 100 << 20


def _rootfs_tar(work: Path) -> Path:
    from capsa.image.sandbox import sandbox_image

    target = work / "rootfs.tar"
    if not target.exists():
        with target.open("wb") as out:
            subprocess.run(
                ["sqfs2tar", str(sandbox_image().rootfs)], stdout=out, check=True, timeout=600
            )
    return target


def _layers(work: Path) -> tuple[bytes, bytes]:
    """A base layer of ~100 MiB of file data and a small top layer (a file, a whiteout)."""
    base = io.BytesIO()
    total = 0
    with tarfile.open(_rootfs_tar(work)) as src, tarfile.open(fileobj=base, mode="w") as out:
        for member in src:
            if member.isreg():
                if total + member.size > OCI_DATA_BYTES:
                    continue
                total += member.size
                out.addfile(member, src.extractfile(member))
            else:
                out.addfile(member)
    top = io.BytesIO()
    with tarfile.open(fileobj=top, mode="w") as out:
        data = b"PRETTY_NAME=bench\n"
        info = tarfile.TarInfo("etc/os-release")
        info.size = len(data)
        out.addfile(info, io.BytesIO(data))
        out.addfile(tarfile.TarInfo("etc/.wh.motd"))
    return base.getvalue(), top.getvalue()


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _docker(path: Path, layers: list[bytes]) -> None:
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [_sha(x) for x in layers]},
        }
    )
    names = [f"{i}/layer.tar" for i in range(len(layers))]
    manifest = [{"Config": "config.json", "RepoTags": ["bench:1"], "Layers": names}]
    with tarfile.open(path, "w") as tar:
        _add(tar, "manifest.json", json.dumps(manifest).encode())
        _add(tar, "config.json", config.encode())
        for name, data in zip(names, layers, strict=True):
            _add(tar, name, data)


def _oci(path: Path, layers: list[bytes]) -> None:
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def blob(data: bytes) -> dict[str, object]:
        digest = _sha(data)
        (blobs / digest.removeprefix("sha256:")).write_bytes(data)
        return {"digest": digest, "size": len(data)}

    zipped = [gzip.compress(x, compresslevel=6, mtime=0) for x in layers]
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [_sha(x) for x in layers]},
        }
    )
    manifest = {"schemaVersion": 2, "config": blob(config.encode()), "layers": [blob(z) for z in zipped]}
    index = {"schemaVersion": 2, "manifests": [blob(json.dumps(manifest).encode())]}
    (path / "index.json").write_text(json.dumps(index))
    (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')


def _oci_inputs() -> tuple[Path, Path, Path]:
    """(docker archive, OCI layout, the merged tar), written once."""
    work = cache_dir() / "bench" / "oci"
    work.mkdir(parents=True, exist_ok=True)
    docker, layout, merged = work / "docker.tar", work / "layout", work / "merged.tar"
    if not (docker.exists() and (layout / "index.json").exists() and merged.exists()):
        base, top = _layers(work)
        _docker(docker, [base, top])
        shutil.rmtree(layout, ignore_errors=True)
        _oci(layout, [base, top])
        from capsa.image.layers import merge_layers
        from capsa.image.oci import open_image

        archive, manifest = open_image(docker)
        with (
            archive,
            merged.open("wb") as raw,
            tarfile.open(fileobj=raw, mode="w|", format=tarfile.PAX_FORMAT) as tar,
        ):
            merge_layers(archive, manifest.layers, tar)
    return docker, layout, merged


def _cpu() -> float:
    """CPU seconds of this process and its waited-for children (tar2sqfs)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _timed(once: Callable[[], None]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), _cpu()
    once()
    return time.perf_counter() - wall, _cpu() - cpu


def bench_oci(runs: int) -> None:
    """Runs alternate (tar2sqfs alone, docker import, OCI gzip import) so that each ratio compares
    runs made under the same load; the figures are the medians of the per-run ratios, in wall time
    and in CPU time (Python and tar2sqfs together: what the import costs a busy machine)."""
    from capsa.image.custom import ROOT_PREFIX
    from capsa.image.layers import merge_layers, squash
    from capsa.image.oci import open_image

    docker, layout, merged = _oci_inputs()
    print(f"oci: merged tar {merged.stat().st_size / (1 << 20):.0f} MiB", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "x.sqfs"
        argv = ["tar2sqfs", "--quiet", "--no-skip", "--force", "--exportable", "--compressor",
                "lz4", "--block-size", "131072", str(out)]  # fmt: skip

        def plain() -> None:
            with merged.open("rb") as fh:
                subprocess.run(argv, stdin=fh, check=True, timeout=600)

        def imported(source: Path) -> Callable[[], None]:
            def once() -> None:  # what Image.from_oci(...).build() does, minus cache and metadata
                archive, manifest = open_image(source)
                with archive:
                    squash(lambda tar: merge_layers(archive, manifest.layers, tar, ROOT_PREFIX), out)

            return once

        kinds = {"tar2sqfs": plain, "docker": imported(docker), "oci_gzip": imported(layout)}
        samples: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
        for _ in range(runs):
            for kind, once in kinds.items():
                samples[kind].append(_timed(once))
        wall = statistics.median(w for w, _ in samples["tar2sqfs"])
        cpu = statistics.median(c for _, c in samples["tar2sqfs"])
        print(f"oci: tar2sqfs on the merged tar  {wall:6.2f} s wall  {cpu:6.2f} s CPU", flush=True)
        figure("oci_tar2sqfs_s", wall, "s")
        for label in ("docker", "oci_gzip"):
            pairs = list(zip(samples["tar2sqfs"], samples[label], strict=True))
            took = statistics.median(w for w, _ in samples[label])
            ratio = statistics.median(w / base for (base, _), (w, _) in pairs)
            cpu_ratio = statistics.median(c / base for (_, base), (_, c) in pairs)
            print(f"oci: import {label:9}  {took:6.2f} s wall = {ratio:4.2f}x tar2sqfs (goal <= 1.5x);"
                  f" CPU {cpu_ratio:4.2f}x", flush=True)  # fmt: skip
            figure(f"oci_import_{label}_s", took, "s")
            figure(f"oci_import_{label}_ratio", ratio, "x", "<= 1.5")
            figure(f"oci_import_{label}_cpu_ratio", cpu_ratio, "x")


# ---------------------------------------------------------------------------------------------
# start / rebuild: recipes


def _recipe_sources(work: Path) -> Path:
    """A tree to copy (capsa's own sources) and a wheel directory (the host's pip, as a wheel)."""
    import capsa

    app = work / "app"
    if not app.exists():
        shutil.copytree(Path(capsa.__file__).parent, app, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = work / "wheels"
    if not any(wheels.glob("*.whl")):
        wheels.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["python3", "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d",
             str(wheels), "six==1.16.0", "attrs==23.2.0"],
            check=True, timeout=600, capture_output=True,
        )  # fmt: skip
    return work


def _recipe(work: Path, name: str, token: str = "", apt: bool = False) -> object:
    import capsa

    image = capsa.Image.debian(name=name, context=work)
    if apt:
        image = image.apt_install("jq")
    image = image.pip_install("six", "attrs", find_links=work / "wheels")
    image = image.copy(work / "app", "/opt/app")
    if token:
        (work / "token").write_text(token)
        image = image.copy(work / "token", "/opt/token")
    return image.run("python3 -m compileall -q /opt/app").env("APP_MODE", "bench")


async def _first_exec(builder: object) -> float:
    start = time.perf_counter()
    vm = await builder.build()  # type: ignore[attr-defined]
    result = await vm.agent.exec("true").run()
    took = time.perf_counter() - start
    assert result.exit_code == 0
    await vm.stop()
    return took


def bench_start(runs: int) -> None:
    import asyncio

    import capsa

    work = _recipe_sources(cache_dir() / "bench" / "recipe")
    image = _recipe(work, "bench-start").workdir("/opt/app")  # type: ignore[attr-defined]
    image.build(progress=lambda line: print(f"start: {line}", flush=True))

    async def both() -> tuple[float, float]:
        # Interleaved, so that the load of a busy machine weighs on both alike; the first round
        # records the templates and is not counted.
        default, custom = [], []
        for i in range(runs + 1):
            took = await _first_exec(capsa.sandbox()), await _first_exec(capsa.sandbox().image(image))
            if i:
                default.append(took[0])
                custom.append(took[1])
        return statistics.median(default), statistics.median(custom)

    default, custom = asyncio.run(both())
    ratio = custom / default
    print(f"start: default image  build() -> first exec {default:6.3f} s", flush=True)
    print(f"start: recipe image   build() -> first exec {custom:6.3f} s"
          f"  = {ratio:4.2f}x default (goal <= 1.2x)", flush=True)  # fmt: skip
    figure("start_default_s", default, "s")
    figure("start_recipe_s", custom, "s")
    figure("start_recipe_ratio", ratio, "x", "<= 1.2")


def bench_rebuild(apt: bool) -> None:
    import uuid

    from capsa.image.custom import images_root
    from capsa.recipes.recipe import layers_root, plan

    work = _recipe_sources(cache_dir() / "bench" / "recipe")
    made = []
    try:
        for last in ("workdir", "run"):
            token = uuid.uuid4().hex
            base = _recipe(work, f"bench-rebuild-{token[:8]}", token, apt)

            def with_last(image: object, value: str, last: str = last) -> object:
                if last == "workdir":
                    return image.workdir(value)  # type: ignore[attr-defined]
                return image.run(f"echo {value} > /opt/last")  # type: ignore[attr-defined]

            first, second = with_last(base, "/opt/app"), with_last(base, "/opt")
            made += [first, second]
            start = time.perf_counter()
            first.build()  # type: ignore[attr-defined]
            full = time.perf_counter() - start
            start = time.perf_counter()
            second.build(progress=lambda line: print(f"rebuild:   {line}", flush=True))  # type: ignore[attr-defined]
            again = time.perf_counter() - start
            ratio = again / full
            print(f"rebuild: full build from scratch        {full:6.2f} s", flush=True)
            print(f"rebuild: last step ({last:7}) changed    {again:6.2f} s"
                  f"  = {ratio:5.3f}x full (goal <= 0.2x)", flush=True)  # fmt: skip
            figure(f"rebuild_full_{last}_s", full, "s")
            figure(f"rebuild_last_{last}_s", again, "s")
            figure(f"rebuild_last_{last}_ratio", ratio, "x", "<= 0.2")
    finally:
        for image in made:
            planned = plan(image)  # type: ignore[arg-type]
            for item in planned:
                shutil.rmtree(layers_root() / item.key, ignore_errors=True)
            shutil.rmtree(images_root() / ("r" + planned[-1].key), ignore_errors=True)


PARTS: dict[str, Callable[[argparse.Namespace], None]] = {
    "oci": lambda args: bench_oci(args.runs),
    "start": lambda args: bench_start(args.runs),
    "rebuild": lambda args: bench_rebuild(not args.no_apt),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(PARTS), help=f"parts: {', '.join(PARTS)}")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-apt", action="store_true", help="rebuild: no apt_install step")
    args = parser.parse_args()
    header("images")
    for part in args.only.split(","):
        PARTS[part](args)


if __name__ == "__main__":
    main()
