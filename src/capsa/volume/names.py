"""What a volume name may be. A name becomes a file name on the host (``<name>.ext4``) and a path
segment in URLs, so it is checked before it touches either: a simple charset, bounded length, never
``/``, ``..``, NUL or a leading dot (which would hide it, or collide with half-made volumes)."""

from __future__ import annotations

import re

from capsa.errors import VolumeError

MAX_NAME = 64
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        shown = repr(name)[:80]
        raise VolumeError(
            f"invalid volume name {shown}",
            name=name[:MAX_NAME] if isinstance(name, str) else "",
            hint=f"1-{MAX_NAME} letters, digits, '.', '_' or '-', starting with a letter or digit, "
            "without '..'",
        )
    return name
