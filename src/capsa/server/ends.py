"""Why sandboxes ended: ``GET /capsa/ends`` (a capsa route, outside E2B's API, which has no field
for it) and the table ``capsa serve ends`` prints. Each ended sandbox's record (its reason, the
console's tail for a guest crash) is kept for ``--keep-ended``; a key sees its tenant's, an admin
key every tenant's."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from capsa.server.durable import Journal
from capsa.server.entry import ApiError
from capsa.server.tenants import Principal

MAX_LIMIT = 1000
PATH = "/capsa/ends"


class EndsApi:
    def __init__(self, journal: Journal | None, principal: Callable[[Request], Principal]) -> None:
        self._journal = journal
        self._principal = principal

    def routes(self) -> list[Route]:
        return [Route(PATH, self.ends, methods=["GET"])]

    async def ends(self, request: Request) -> Response:
        """The newest ends first: ``[{sandboxID, tenant, templateID, reason, detail, startedAt,
        endedAt, metadata}]`` (times in unix seconds), at most ``limit`` (default 100)."""
        scope = self._principal(request).scope
        raw = request.query_params.get("limit", "100")
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
            raise ApiError(400, f"limit must be from 1 to {MAX_LIMIT}")
        if self._journal is None:
            raise ApiError(501, "this server keeps no end records", hint="serve with a --state-dir")
        return JSONResponse(self._journal.ends(scope, int(raw)))


def table(rows: list[dict[str, Any]]) -> str:
    """``capsa serve ends``: one line per end, newest first; a guest crash's console tail below."""
    lines = [f"{'ENDED (UTC)':19}  {'SANDBOX':22}  {'TENANT':12}  {'TEMPLATE':20}  REASON"]
    for row in rows:
        ended = datetime.datetime.fromtimestamp(row["endedAt"], datetime.UTC)
        lines.append(
            f"{ended:%Y-%m-%d %H:%M:%S}  {row['sandboxID']:22}  {row['tenant']:12}  "
            f"{row['templateID']:20}  {row['reason']}"
        )
        for text in str(row["detail"]).splitlines()[-10:]:
            lines.append(f"    | {text}")
    return "\n".join(lines)
