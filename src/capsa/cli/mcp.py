"""``capsa mcp``: serve sandboxes as Model Context Protocol tools over stdio."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from capsa.cli._sandbox_flags import add_sandbox_flags, sandbox_options
from capsa.errors import ConfigError

log = logging.getLogger(__name__)


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "mcp",
        help="serve sandboxes as MCP tools over stdio (for agent tools that speak MCP)",
        description=(
            "Run a Model Context Protocol server on stdin/stdout whose tools create sandboxes,\n"
            "run commands and Python code in them, read, write and list their files, and kill\n"
            "them: create_sandbox, list_sandboxes, run_command, run_code, read_file, write_file,\n"
            "list_files, kill_sandbox. An MCP client starts it as a subprocess (no port, no API\n"
            "key: whoever runs it is trusted). Logs go to stderr. Needs the server extra:\n"
            "pip install 'capsa[server]'."
        ),
        epilog=(
            "examples:\n"
            "  capsa mcp\n"
            "  capsa mcp --pool base=2 --max-sandboxes 4\n\n"
            "client configuration (Claude Desktop, Cursor, ...):\n"
            '  {"mcpServers": {"capsa": {"command": "capsa", "args": ["mcp", "--pool", "base=1"]}}}\n\n'
            "On stdin EOF, SIGTERM or SIGINT the server kills its sandboxes."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_sandbox_flags(parser)
    parser.set_defaults(handler=_mcp)


def _mcp(args: argparse.Namespace) -> int:
    try:
        import anyio  # noqa: PLC0415 (optional dependency)

        from capsa.server.mcp import McpConfig, serve_stdio  # noqa: PLC0415
    except ImportError as exc:
        raise ConfigError(
            f"capsa mcp needs the server extra ({exc.name} is missing)",
            hint="pip install 'capsa[server]'",
        ) from None
    config = McpConfig(**sandbox_options(args))
    if not args.verbose:
        logging.getLogger("capsa.server").setLevel(logging.INFO)
    anyio.run(serve_stdio, config)
    return 0
