"""The in-guest half of the code interpreter: a small persistent Python process.

The host starts ``python3 -u -c BOOTSTRAP`` through the agent and sends ``SOURCE`` as the first
line of its stdin (a JSON string: an exec argument is limited to 4 KiB), then keeps it running.
Requests arrive as JSON lines on stdin; events leave as JSON lines on the process's original
stdout, which the interpreter keeps for itself (fd 1 is pointed at stderr, so that output written
straight to the file descriptor by user code or its children cannot corrupt the framing). This
module is only read on the host as text (``SOURCE``); it runs in the guest's own Python.
"""

from __future__ import annotations

from pathlib import Path

SOURCE = (Path(__file__).with_name("_interp_main.py")).read_text(encoding="utf-8")
BOOTSTRAP = (
    "import json, sys; exec(compile(json.loads(sys.stdin.readline()), '<capsa-interpreter>', 'exec'))"
)
