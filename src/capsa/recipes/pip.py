"""``Image.pip_install``: binary wheels for the guest's Python, resolved and unpacked on the host.

``pip download --only-binary=:all:`` runs on the host with the guest's interpreter tags (CPython
3.11, x86_64 manylinux up to bookworm's glibc 2.36), so it resolves dependencies as the guest's pip
would; the wheels are then unpacked straight from their zip into the layer's tar
(``/usr/local/lib/python3.11/dist-packages``, scripts and console entry points in
``/usr/local/bin``) by :mod:`capsa.recipes.wheel`, owned by root, without root on the host and
without a build VM.

It never builds anything, which ``--only-binary`` alone does not ensure: a local path, a
``name @ url`` requirement, or a wheel whose metadata ``Requires-Dist``s one, makes pip run that
project's build backend (or ``setup.py``, or ``git``) on the host. So requirement strings are
checked before pip runs (:func:`check_requirement`: names, extras, versions, markers, nothing
else); pip runs under an audit hook that refuses to start any process (no backend can run,
whatever pip is asked); and a downloaded wheel naming a direct reference fails the step.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from capsa.errors import ConfigError, ImageError
from capsa.image.context import inside
from capsa.image.rootfs import GUEST_PYTHON
from capsa.recipes.layertar import LayerTar
from capsa.recipes.steps import Step, tree_digest
from capsa.recipes.wheel import SITE, direct_references, unpack

__all__ = ["SITE", "add_wheels", "check_requirement", "pip_inputs", "pip_step"]

log = logging.getLogger(__name__)

PIP_TIMEOUT = 900.0
MAX_STEP_BYTES = 32 << 30  # uncompressed bytes of all the wheels of one step
_MAJOR, _MINOR = GUEST_PYTHON
GUEST_GLIBC = 36  # bookworm's glibc 2.36
# pip 23 does not expand manylinux_2_X to older glibc versions itself: list every one.
PLATFORMS = (
    *(f"manylinux_2_{minor}_x86_64" for minor in range(GUEST_GLIBC, 4, -1)),
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
)


# A requirement is a project name with optional extras, version specifiers and an environment
# marker (PEP 508 without its URL form), checked before pip sees it: a path, a URL, a direct
# reference (``name @ url``), an archive or an option (``-e``, ``-r``, ``--index-url``) never is.
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_SPEC = r"(?:~=|===|==|!=|<=|>=|<|>)\s*[A-Za-z0-9.*+!_-]+"
_SPECS = rf"{_SPEC}(?:\s*,\s*{_SPEC})*"
_REQUIREMENT = re.compile(
    rf"(?P<name>{_NAME})\s*(?:\[\s*(?:{_NAME}(?:\s*,\s*{_NAME})*)?\s*\])?"
    rf"\s*(?:\(\s*{_SPECS}\s*\)|{_SPECS})?"
    r"\s*(?:;[A-Za-z0-9_.\s'\"()<>=!~,*+-]+)?"  # a marker: no '@', '/', ':' or backslash
)
_MAX_REQUIREMENT = 1000
# pip reads a requirement whose name ends so as a local archive (a file URL), whatever exists.
_ARCHIVES = (".zip", ".whl", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz", ".tar.xz", ".txz",
             ".tlz", ".tar.lz", ".tar.lzma")  # fmt: skip
_WEB = ("http://", "https://")


def check_requirement(req: object) -> str:
    """``req`` stripped, if it names a project (see :data:`_REQUIREMENT`); ConfigError if not."""
    matched = _REQUIREMENT.fullmatch(req.strip()) if isinstance(req, str) else None
    if (
        not isinstance(req, str)
        or matched is None
        or len(req) > _MAX_REQUIREMENT
        or matched["name"].lower().endswith(_ARCHIVES)
    ):
        raise ConfigError(
            f"pip_install(): {req!r:.80} is not a requirement capsa installs",
            hint="give a project name with optional extras and versions ('attrs==23.*', "
            "'pkg[extra]>=1; python_version<\"3.12\"'); paths, URLs, direct references "
            "(name @ url) and pip options are refused: wheels come only from an index (index_url=) "
            "or a wheel directory inside the recipe's context (find_links=)",
        )
    return req.strip()


def pip_step(
    requirements: tuple[str, ...],
    index_url: str | None,
    find_links: str | Path | None,
    context: Path | None = None,
) -> Step:
    """``find_links``: an http(s) URL, or a directory resolved inside ``context``."""
    if not requirements:
        raise ConfigError("pip_install() needs at least one requirement")
    reqs = tuple(check_requirement(req) for req in requirements)
    options: list[tuple[str, str]] = []
    if index_url is not None:
        if not isinstance(index_url, str) or not index_url.startswith(_WEB) or "\0" in index_url:
            raise ConfigError(
                f"pip_install(): index_url must be an http(s) URL, got {index_url!r:.60}",
                hint="a local wheel directory goes in find_links=",
            )
        options.append(("index_url", index_url))
    if find_links is not None:
        links = str(find_links)
        if not links.startswith(_WEB):
            if context is None:
                raise ConfigError("pip_install(): a local find_links needs the recipe's context")
            folder = inside(context, links, "pip_install()'s find_links")
            if not folder.is_dir():
                raise ConfigError(f"pip_install(): find_links {folder} is not a directory")
            links = str(folder)
        options.append(("find_links", links))
    return Step("pip", reqs, tuple(options))


def pip_inputs(step: Step) -> str:
    """A local wheel directory's content is part of the layer's key."""
    links = step.option("find_links")
    return tree_digest(Path(links)) if links and not links.startswith(_WEB) else ""


# pip runs in-process under this audit hook (PEP 578): it may download, never start a process, so
# no build backend, setup.py, VCS checkout or build-dependency install can run on the host, whatever
# a requirement, an index or a wheel's metadata asks for. ``-P``: nothing is imported from the
# current directory (a ``pip/`` package in a recipe's folder is not pip).
_REFUSED = "capsa refused to start a process in pip"
_FATAL = "PermissionError: capsa: pip may only download wheels"  # how the refusal ends pip
_SHIM = f"""
import os, sys
_BLOCKED = {{"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
            "os.forkpty"}}
def _hook(event, args):
    if event in _BLOCKED:  # (pip's user agent asks lsb_release and rustc, and shrugs if refused)
        shown = repr(args[1] if event == "subprocess.Popen" else args[:2])[:300]
        sys.stderr.write("{_REFUSED}: " + event + " " + shown + "\\n")
        raise PermissionError("{_FATAL.partition(": ")[2]}")
sys.addaudithook(_hook)
import runpy
sys.argv[0] = "pip"
runpy.run_module("pip", run_name="__main__", alter_sys=True)
"""


def _pip(
    args: list[str], env: dict[str, str], cwd: Path, timeout: float
) -> subprocess.CompletedProcess[str]:
    """``python -m pip ARGS``, under the audit hook of :data:`_SHIM`."""
    argv = [sys.executable, "-P", "-c", _SHIM, *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd,
                          stdin=subprocess.DEVNULL, check=False)  # fmt: skip


def _download(step: Step, dest: Path) -> None:
    argv = ["download", "--only-binary=:all:", "--dest", str(dest),
            "--python-version", f"{_MAJOR}.{_MINOR}", "--implementation", "cp",
            "--abi", f"cp{_MAJOR}{_MINOR}", "--abi", "abi3", "--abi", "none",
            "--no-input", "--disable-pip-version-check", "--progress-bar", "off"]  # fmt: skip
    for platform in PLATFORMS:
        argv += ["--platform", platform]
    index = step.option("index_url")
    links = step.option("find_links")
    if index:
        argv += ["--index-url", index]
    elif links:
        argv.append("--no-index")  # a wheel directory alone: never reach out to PyPI
    if links:
        argv += ["--find-links", links]
    argv += ["--", *(check_requirement(req) for req in step.args)]  # again: steps are data
    env = dict(os.environ, PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    if index or links:
        env = _sources_only_from_step(env, dest)
    try:
        done = _pip(argv, env, dest, PIP_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        raise ImageError(f"pip download of {' '.join(step.args)} took over {PIP_TIMEOUT}s") from exc
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip()[-3000:]
        if _FATAL in done.stderr:  # pip's own traceback of the refusal says nothing more
            refused = [line for line in done.stderr.splitlines() if line.startswith(_REFUSED)]
            shown = "\n".join([*done.stdout.strip().splitlines()[-10:], *refused[-1:]])
            raise ImageError(
                f"pip_install({', '.join(step.args)}): a requirement needs a build, which capsa "
                f"never runs on the host:\n{shown}",
                hint="every package (dependencies included) must come as a binary wheel from the "
                "index or wheel directory; build anything else in a run() step",
            )
        missing = "No matching distribution" in output or "Could not find a version" in output
        raise ImageError(
            f"pip_install({', '.join(step.args)}) failed:\n{output}",
            hint=(
                f"no binary wheel for the guest's Python (CPython {_MAJOR}.{_MINOR}, x86_64 "
                "manylinux, glibc 2.36) matches: pick a version that ships such a wheel, or build "
                "one in a run() step"
                if missing
                else "check the requirement and the index (index_url=, find_links=)"
            ),
        )


# pip settings that add or replace where packages come from: with index_url= or find_links=, a
# step's wheels come from what it names only, whatever the host's pip configuration adds.
_SOURCE_KEYS = {"index-url", "extra-index-url", "find-links", "no-index"}
# Settings of the host's pip configuration that still apply (how to reach an index, not which).
_KEPT_KEYS = {"cert", "client-cert", "proxy", "timeout", "retries", "trusted-host"}


def _env_name(key: str) -> str:
    return "PIP_" + key.upper().replace("-", "_")


def _sources_only_from_step(env: dict[str, str], cwd: Path) -> dict[str, str]:
    """``env`` for a pip that reads no configuration file and no source variable, keeping the
    configuration files' connection settings (certificates, proxy, timeouts) as variables."""
    kept: dict[str, str] = {}
    try:
        listed = _pip(["config", "list"], env, cwd, 60).stdout
    except (OSError, subprocess.SubprocessError):
        listed = ""
    for line in listed.splitlines():  # global.cert='/etc/ssl/certs/ca-certificates.crt'
        name, _, value = line.partition("=")
        key = name.rpartition(".")[2]
        if key in _KEPT_KEYS and len(value) >= 2 and value[0] == value[-1] == "'":
            kept.setdefault(_env_name(key), value[1:-1])
    clean = {k: v for k, v in env.items() if k not in {_env_name(key) for key in _SOURCE_KEYS}}
    return {**kept, **clean, "PIP_CONFIG_FILE": os.devnull}


def add_wheels(layer: LayerTar, step: Step) -> None:
    """Download the step's wheels (with their dependencies) and unpack them into ``layer``.

    Everything pip left must be a wheel whose metadata names no direct reference (pip fetched
    such a dependency from wherever it pointed: nothing of it reaches the image); the wheels'
    uncompressed bytes, all together, are at most :data:`MAX_STEP_BYTES`."""
    what = f"pip_install({', '.join(step.args)})"
    with tempfile.TemporaryDirectory(prefix="capsa-wheels-") as tmp:
        _download(step, Path(tmp))
        files = sorted(Path(tmp).iterdir())
        if not files:
            raise ImageError(f"{what} downloaded no wheel")
        others = [f.name for f in files if f.suffix != ".whl" or not f.is_file() or f.is_symlink()]
        if others:
            raise ImageError(f"{what}: pip left files that are not wheels: {others[:5]}",
                             hint="capsa installs binary wheels only")  # fmt: skip
        for wheel in files:
            refs = direct_references(wheel)
            if refs:
                raise ImageError(
                    f"{what}: {wheel.name} depends on direct references: {refs[:3]}",
                    hint="a dependency must come from the index or wheel directory by name",
                )
        spent = 0
        for wheel in files:
            spent += unpack(layer, wheel)
            if spent > MAX_STEP_BYTES:
                raise ImageError(f"{what}: the wheels expand to over {MAX_STEP_BYTES} bytes",
                                 hint="raise capsa.recipes.pip.MAX_STEP_BYTES")  # fmt: skip
            log.info("pip_install: unpacked %s", wheel.name)
