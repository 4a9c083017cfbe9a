"""The in-guest half of the code interpreter: a small persistent Python process.

The host starts it with ``python3 -u -c SOURCE`` through the agent and keeps it running. Requests
arrive as JSON lines on stdin; events leave as JSON lines on the process's original stdout, which
the interpreter keeps for itself (fd 1 is pointed at stderr, so that output written straight to the
file descriptor by user code or its children cannot corrupt the framing). This module is only read
on the host as text (``SOURCE``); it runs in the guest's own Python.
"""

from __future__ import annotations

from pathlib import Path

SOURCE = (Path(__file__).with_name("_interp_main.py")).read_text(encoding="utf-8")
