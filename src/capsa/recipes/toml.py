"""TOML image recipes: ``capsa image build FILE`` and :func:`load_recipe`.

The file names the image and lists ``[[steps]]`` tables, each with exactly one of ``copy`` (and
``to``), ``env`` (a table), ``workdir``, ``run`` (``timeout``, ``network``), ``pip_install``
(``index_url``, ``find_links``) and ``apt_install`` (``sources``); the format is documented in
docs/images.md. The file's directory is the recipe's context: ``copy`` sources and ``find_links``
directories resolve inside it, and nothing outside it is read (:mod:`capsa.image.context`).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from capsa.errors import ConfigError
from capsa.recipes.image import Image
from capsa.recipes.steps import _text

_TOML_KEYS = {"name", "base", "steps"}


def read_recipe(path: Path) -> Image:
    """An image recipe from a TOML file (format in docs/images.md); ``copy`` sources and
    ``find_links`` resolve inside the file's directory. ConfigError for a malformed recipe."""
    path = Path(path).expanduser().absolute()
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read the recipe {path}: {exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"the recipe {path} is not valid TOML: {exc}") from exc
    unknown = set(data) - _TOML_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown recipe keys {sorted(unknown)}", hint="name, base, steps")
    base = data.get("base", "debian")
    if base != "debian":
        raise ConfigError(f'{path}: base must be "debian", got {base!r:.40}')
    image = Image.debian(name=str(data.get("name") or path.stem), context=path.parent)
    steps = data.get("steps", [])
    if not isinstance(steps, list):
        raise ConfigError(f"{path}: steps must be an array of tables ([[steps]])")
    for number, entry in enumerate(steps, 1):
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: step {number} is not a table")
        try:
            image = _toml_step(image, dict(entry))
        except ConfigError as exc:
            raise ConfigError(f"{path}: step {number}: {exc.message}", hint=exc.hint) from exc
    return image


def _strings(value: object, what: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(v, str) for v in items):
        raise ConfigError(f"{what} must be a string or a non-empty array of strings")
    return list(items)


def _toml_step(image: Image, entry: dict[str, Any]) -> Image:
    kinds = [k for k in ("copy", "env", "workdir", "run", "pip_install", "apt_install") if k in entry]
    if len(kinds) != 1:
        raise ConfigError(
            "a step has exactly one of copy, env, workdir, run, pip_install, apt_install",
            hint='e.g. {run = "make"} or {copy = "./app", to = "/opt/app"}',
        )
    kind = kinds[0]
    value = entry.pop(kind)
    allowed = {
        "copy": {"to"},
        "run": {"timeout", "network"},
        "pip_install": {"index_url", "find_links"},
        "apt_install": {"sources"},
    }
    extra = set(entry) - allowed.get(kind, set())
    if extra:
        raise ConfigError(f"unknown keys for a {kind} step: {sorted(extra)}")
    if kind == "copy":
        if "to" not in entry:
            raise ConfigError("a copy step needs `to` (the destination in the image)")
        return image.copy(_text(value, "copy"), _text(entry["to"], "to"))
    if kind == "env":
        if not isinstance(value, dict) or not value:
            raise ConfigError('env takes a table, e.g. env = {APP_MODE = "test"}')
        for key, val in value.items():
            image = image.env(key, _text(val, f"env {key}"))
        return image
    if kind == "workdir":
        return image.workdir(_text(value, "workdir"))
    if kind == "run":
        network = entry.get("network", False)
        if not isinstance(network, bool):
            raise ConfigError("run's network is true or false")
        return image.run(_text(value, "run"), timeout=entry.get("timeout", 1800.0), network=network)
    if kind == "pip_install":
        links = entry.get("find_links")
        if links is not None:
            _text(links, "find_links")
        index = entry.get("index_url")
        return image.pip_install(*_strings(value, "pip_install"), index_url=index, find_links=links)
    return image.apt_install(*_strings(value, "apt_install"), sources=entry.get("sources"))


def load_recipe(path: Path) -> Image:
    """An image recipe from a TOML file (format in docs/images.md); relative ``copy`` sources
    resolve against the file's directory. ConfigError for a malformed recipe."""
    return read_recipe(Path(path))
