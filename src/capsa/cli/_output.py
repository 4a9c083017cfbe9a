"""Printing command results: aligned ``key value`` lines, or one JSON object with ``--json``."""

from __future__ import annotations

import json
import sys


def emit(data: dict[str, str], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(data) + "\n")
        return
    width = max((len(key) for key in data), default=0) + 2
    sys.stdout.write("".join(f"{key:{width}}{value}\n" for key, value in data.items()))
