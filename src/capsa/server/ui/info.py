"""The read-only JSON the pages load besides their streams: the server page's pools, templates,
recent ends and health (``/ui/api/server``), and a sandbox's processes as the guest's ``ps`` sees
them (``/ui/api/sandboxes/{id}/processes``)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from capsa.errors import CapsaError
from capsa.server.api_error import ApiError
from capsa.server.entry import TEMPLATES
from capsa.server.ui.deps import UiDeps

log = logging.getLogger(__name__)

ENDS_SHOWN = 50
PS_TIMEOUT = 10.0  # seconds the guest's process listing may take
MAX_PROCESSES = 500  # rows of ps shown
# The guest image has no ps: read /proc. One line "uptime own-pid", then per process
# "pid<TAB>user<TAB>stat<TAB>cmdline" (cmdline's NULs as spaces); kernel threads (no cmdline) left out.
_PS = (
    'read -r up _ < /proc/uptime; echo "$up $$"; '
    'for d in /proc/[0-9]*; do read -r st < "$d/stat" 2>/dev/null || continue; '
    "c=$(tr '\\0' ' ' < \"$d/cmdline\" 2>/dev/null); [ -n \"$c\" ] || continue; "
    'u=$(stat -c %U "$d" 2>/dev/null); '
    'printf \'%s\\t%s\\t%s\\t%s\\n\' "${d#/proc/}" "$u" "$st" "$c"; done'
)
_TICKS = 100  # USER_HZ: /proc's clock ticks per second
_PAGE = 4096


def routes(deps: UiDeps) -> list[BaseRoute]:
    info = Info(deps)
    return [
        Route("/ui/api/server", info.server, methods=["GET"]),
        Route("/ui/api/sandboxes/{sandbox_id}/processes", info.processes, methods=["GET"]),
    ]


class Info:
    def __init__(self, deps: UiDeps) -> None:
        self.deps = deps

    async def server(self, request: Request) -> Response:
        session = self.deps.sessions.require(request)
        scope = session.principal.scope
        registry = self.deps.registry
        mine = registry.list(scope)
        running: dict[str, int] = {}
        for entry in mine:
            running[entry.template] = running.get(entry.template, 0) + 1
        images = await asyncio.to_thread(_named_images)
        templates = [{"name": t, "kind": "built-in", "running": running.get(t, 0)} for t in TEMPLATES]
        templates += [{"name": n, "kind": k, "running": running.get(n, 0)} for n, k in images]
        ready = self.deps.ready()
        return JSONResponse(
            {
                "health": {
                    "status": "ok" if ready else "starting",
                    "uptime": time.time() - self.deps.started,
                    "running": len(registry),
                    "visible": len(mine),
                    "paused": sum(1 for e in mine if e.state == "paused"),
                    "maxSandboxes": registry.max_sandboxes,
                    "domain": self.deps.domain,
                    "streams": self.deps.streams.counts(),
                },
                "pools": [
                    {"template": name, "ready": ready_now, "size": size}
                    for name, (ready_now, size) in registry.pool_fill().items()
                ],
                "templates": templates,
                "ends": self._ends(scope),
                "endCounts": _end_counts(self.deps),
            }
        )

    def _ends(self, scope: str | None) -> list[dict[str, Any]] | None:
        """The newest ends the session may see; None without a journal (no --state-dir)."""
        if self.deps.journal is None:
            return None
        return self.deps.journal.ends(scope, ENDS_SHOWN)

    async def processes(self, request: Request) -> Response:
        session = self.deps.sessions.require(request)
        entry = self.deps.registry.find(request.path_params["sandbox_id"], session.principal.scope)
        if not entry.running:
            raise ApiError(409, f"sandbox {entry.id} is paused: it runs no process")
        agent: Any = entry.vm.agent
        try:
            command = agent.exec("sh").args(["-c", _PS]).timeout(PS_TIMEOUT)
            result = await asyncio.wait_for(command.run(), PS_TIMEOUT + 2)
        except (CapsaError, TimeoutError) as exc:
            raise ApiError(502, f"listing the guest's processes failed: {exc}") from None
        if not result.ok:
            raise ApiError(502, f"listing the guest's processes failed: {result.stderr[:200]}")
        return JSONResponse({"processes": parse_ps(result.stdout)[:MAX_PROCESSES]})


def parse_ps(text: str) -> list[dict[str, Any]]:
    """The /proc listing of :data:`_PS` as rows: pid, user, seconds running, resident bytes,
    command (the kernel's name in brackets for a kernel thread)."""
    lines = text.splitlines()
    try:
        up, own = lines[0].split()
        uptime, me = float(up), int(own)
    except (IndexError, ValueError):
        return []
    rows: list[dict[str, Any]] = []
    for line in lines[1:]:
        parts = line.split("\t", 3)
        if len(parts) < 3 or not parts[0].isdigit() or ")" not in parts[2]:
            continue
        head, _, rest = parts[2].rpartition(")")
        fields = rest.split()
        if len(fields) < 22:
            continue
        if me in (int(parts[0]), int(fields[1])):  # the listing itself and its subshells
            continue
        name = head.partition("(")[2]
        command = parts[3].strip() if len(parts) > 3 else ""
        rows.append(
            {
                "pid": int(parts[0]),
                "user": parts[1],
                "state": fields[0],
                "seconds": max(0.0, uptime - int(fields[19]) / _TICKS),
                "rss": int(fields[21]) * _PAGE,
                "command": command or f"[{name}]",
            }
        )
    rows.sort(key=lambda r: r["pid"])
    return rows


def _named_images() -> list[tuple[str, str]]:
    """The images ``capsa image import/build --name`` registered (name, kind)."""
    try:
        from capsa.recipes import store  # noqa: PLC0415 (optional here, as for the registry)
    except ImportError:
        return []
    try:
        return [(image.name, image.kind) for image in store.named_images()]
    except (CapsaError, OSError) as exc:
        log.warning("listing the named images failed: %s", exc)
        return []


def _end_counts(deps: UiDeps) -> dict[str, float]:
    """Sandbox ends since the server started, by reason (the Prometheus counter's)."""
    counts: dict[str, float] = {}
    for family in deps.metrics.ends.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                counts[sample.labels["reason"]] = sample.value
    return counts
