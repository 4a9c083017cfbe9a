"""``capsa serve``: run sandboxes behind an HTTP API that the E2B SDKs talk to unchanged."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import ssl
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from capsa.cli._sandbox_flags import add_sandbox_flags, sandbox_options
from capsa.errors import ConfigError
from capsa.volume.store import check_size_mb

if TYPE_CHECKING:
    from capsa.server.quota import TenantLimits
    from capsa.server.server_secrets import ServerSecrets
    from capsa.server.tenants import ApiKey, KeyRing

log = logging.getLogger(__name__)


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "serve",
        help="serve sandboxes to the E2B SDKs (e2b, e2b-code-interpreter)",
        description=(
            "Run an HTTP server that the E2B Python/JS SDKs use unchanged: point them at it with\n"
            "E2B_API_URL=http://HOST:PORT, E2B_SANDBOX_URL=http://HOST:PORT and E2B_API_KEY=KEY.\n"
            "One port serves the control plane, every sandbox's envd API and code interpreter,\n"
            "GET /health (unauthenticated) and GET /metrics (Prometheus, any API key). Needs the\n"
            "server extra: pip install 'capsa[server]'."
        ),
        epilog=(
            "examples:\n"
            "  CAPSA_API_KEY=secret capsa serve\n"
            "  capsa serve --api-key-file keys.txt --pool base=4 --pool code-interpreter-v1=2\n"
            "  capsa serve --ray HEAD:6379 --pool base=2    # one endpoint for a Ray cluster\n"
            "  capsa serve --tls auto    # HTTPS: the log names the CA file clients trust\n\n"
            "API key file: one key per line; '#' starts a comment line. A plain KEY belongs to the\n"
            "tenant 'default'; KEY tenant=NAME [admin] [max_sandboxes=N] [creates_per_minute=N]\n"
            "names its tenant. A sandbox belongs to its creator's tenant: other tenants' keys get\n"
            "404 for it and do not list it; an admin key sees every tenant's. max_sandboxes and\n"
            "creates_per_minute limit the tenant (HTTP 429), beside --max-sandboxes. CAPSA_API_KEY\n"
            "is an admin key of the tenant 'default'.\n\n"
            "templates: base (capsa's default image), code-interpreter-v1 (the same, with the\n"
            "Python interpreter started at create). On SIGTERM the server stops accepting and\n"
            "pauses its running sandboxes into the state dir (--state-dir); after a restart they\n"
            "resume on their next call, as paused sandboxes and snapshots do. `capsa serve ends`\n"
            "prints why recent sandboxes ended.\n\n"
            "With --ray the sandboxes run on the Ray cluster's nodes that offer the custom resource\n"
            "capsa_slots (one capsa host actor per node; see docs/scale-out.md), --pool T=N keeps N\n"
            "per node, --max-sandboxes counts the whole cluster, and pause/resume is refused\n"
            "(501). Needs the ray extra: pip install 'capsa[ray]'."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=3000, help="port to bind (default 3000)")
    parser.add_argument(
        "--domain",
        metavar="DOMAIN",
        help="domain of the sandboxes' ports: {port}-{sandbox_id}.DOMAIN reaches a port of a "
        "sandbox (get_host); default localhost:<port> (capsa.localhost:<port> with TLS), which a "
        "browser on this machine resolves",
    )
    parser.add_argument(
        "--api-key-file",
        metavar="FILE",
        help="accepted API keys, one per line, each optionally with tenant=NAME, admin, "
        "max_sandboxes=N, creates_per_minute=N (see below; CAPSA_API_KEY adds an admin key)",
    )
    parser.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="place the sandboxes on this Ray cluster (HEAD:6379, or 'auto' on a node) instead of "
        "this machine; --pool N is then per node",
    )
    parser.add_argument(
        "--metrics-interval",
        type=float,
        default=5.0,
        metavar="S",
        help="sample each running sandbox's CPU, memory and disk every S seconds, for "
        "get_metrics and /metrics (default 5; 0 turns sampling off)",
    )
    parser.add_argument(
        "--no-ui",
        action="store_true",
        help="do not serve the dashboard at /ui (log in there with an API key)",
    )
    add_state_flags(parser)
    parser.add_argument(
        "--secrets-file",
        metavar="FILE",
        help="secrets the server offers its sandboxes (TOML; docs/secrets.md): per template, or per "
        "create (capsa_secrets); values may come from the server's environment",
    )
    parser.add_argument(
        "--upstream-ca",
        metavar="FILE",
        action="append",
        default=[],
        help="also trust this PEM CA when the secrets proxy verifies an upstream (private CAs); "
        "repeatable",
    )
    parser.add_argument(
        "--volume-size-mb",
        type=int,
        default=1024,
        metavar="MB",
        help="size of each volume created through the API (E2B's create has no size; default 1024)",
    )
    add_sandbox_flags(parser)
    add_limit_flags(parser)
    add_tls_flags(parser)
    parser.set_defaults(handler=_serve)


def add_tls_flags(parser: argparse.ArgumentParser) -> None:
    """HTTPS for the API, envd and ingress (docs/server.md, "HTTPS")."""
    group = parser.add_argument_group("HTTPS")
    group.add_argument(
        "--tls",
        choices=["auto"],
        help="serve HTTPS with a certificate for DOMAIN and *.DOMAIN from a local CA made (once) in "
        "--tls-dir; clients trust its ca.pem (NODE_EXTRA_CA_CERTS) or bundle.pem (SSL_CERT_FILE)",
    )
    group.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this PEM certificate chain")
    group.add_argument("--tls-key", metavar="FILE", help="the unencrypted PEM key of --tls-cert")
    group.add_argument(
        "--tls-dir",
        metavar="DIR",
        help="where --tls auto keeps its CA and certificate (default $XDG_DATA_HOME/capsa/tls, "
        "else ~/.local/share/capsa/tls)",
    )


def tls_from(args: argparse.Namespace, domain: str) -> ssl.SSLContext | None:
    """The server's TLS context from the flags (checked), or None for plain HTTP."""
    from capsa.server import tls  # noqa: PLC0415 (server extra: cryptography)

    given = args.tls_cert is not None or args.tls_key is not None
    if args.tls is not None and given:
        raise ConfigError("--tls auto and --tls-cert/--tls-key exclude each other")
    if given:
        if args.tls_cert is None or args.tls_key is None:
            raise ConfigError("--tls-cert and --tls-key go together")
        tls.check_given(Path(args.tls_cert), Path(args.tls_key), domain)
        return tls.server_context(tls.TlsFiles(Path(args.tls_cert), Path(args.tls_key)))
    if args.tls is None:
        if args.tls_dir is not None:
            raise ConfigError("--tls-dir is for --tls auto")
        return None
    bound = () if args.host in ("0.0.0.0", "::", "localhost") else (args.host,)
    try:
        extra = tuple(str(ipaddress.ip_address(h)) for h in bound)
    except ValueError:
        extra = ()
    files, context = tls.auto(Path(args.tls_dir) if args.tls_dir else tls.default_dir(), domain, extra)
    log.info(
        "HTTPS with a certificate from the local CA %s: clients trust it with SSL_CERT_FILE=%s "
        "(the system's CAs and it) or NODE_EXTRA_CA_CERTS=%s",
        files.ca,
        files.bundle,
        files.ca,
    )
    return context


def add_state_flags(parser: argparse.ArgumentParser) -> None:
    """The state dir (docs/server.md, "State and restarts") and ``capsa serve ends``."""
    parser.add_argument(
        "action",
        nargs="?",
        choices=["ends"],
        help="ends: print the recent ends of the state dir's sandboxes (newest first) and exit",
    )
    group = parser.add_argument_group("state")
    group.add_argument(
        "--state-dir",
        metavar="DIR",
        help="keep paused sandboxes, snapshots and end records here across restarts (one server "
        "per DIR); default $XDG_STATE_HOME/capsa/serve (~/.local/state/capsa/serve)",
    )
    group.add_argument(
        "--shutdown-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="on SIGTERM, pause the running sandboxes within S seconds (they resume on their "
        "next call after the restart); those not paused by then are killed (default 60)",
    )
    group.add_argument(
        "--keep-ended",
        default="24h",
        metavar="DURATION",
        help="keep an ended sandbox's record (its end reason) this long: 90s, 30m, 24h, 7d "
        "(default 24h)",
    )
    group.add_argument(
        "--limit", type=int, default=50, metavar="N", help="with 'ends': print at most N (default 50)"
    )


def duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``24h``, ``7d`` in seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], units[text[-1]]) if text[-1:] in units else (text, 1)
    try:
        value = float(number) * unit
    except ValueError:
        value = -1.0
    if not 0 < value <= 366 * 86400:
        raise ConfigError(f"--keep-ended takes a duration such as 90s, 30m, 24h or 7d, got {text!r}")
    return value


def state_dir(args: argparse.Namespace) -> Path:
    from capsa.server.statedb import default_state_dir  # noqa: PLC0415 (server extra)

    return Path(args.state_dir).expanduser() if args.state_dir else default_state_dir()


def _ends(args: argparse.Namespace) -> int:
    from capsa.server.ends import table  # noqa: PLC0415 (server extra)
    from capsa.server.statedb import read_ends  # noqa: PLC0415

    if not 1 <= args.limit <= 100_000:
        raise ConfigError("--limit takes 1 to 100000")
    sys.stdout.write(table(read_ends(state_dir(args), None, args.limit)) + "\n")
    return 0


def add_limit_flags(parser: argparse.ArgumentParser) -> None:
    """The HTTP limits of ``capsa serve`` (docs/server.md, "Limits")."""
    group = parser.add_argument_group("HTTP limits")
    group.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="close a connection whose request headers are not complete within S seconds (default 10)",
    )
    group.add_argument(
        "--keep-alive-timeout",
        type=int,
        default=5,
        metavar="S",
        help="close an idle keep-alive connection after S seconds (default 5)",
    )
    group.add_argument(
        "--body-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="answer 408 when a request body pauses for S seconds (default 30)",
    )
    group.add_argument(
        "--max-connections",
        type=int,
        default=1000,
        metavar="N",
        help="answer 503 past N open connections (default 1000)",
    )
    group.add_argument(
        "--max-upload-mb",
        type=int,
        default=1024,
        metavar="MB",
        help="largest /files upload, streamed to the guest (default 1024; control-plane bodies: 1 MiB)",
    )


def limits_from(args: argparse.Namespace) -> Any:
    """The server's :class:`~capsa.server.limits.Limits` from the flags (checked)."""
    from capsa.server.limits import Limits, MiB  # noqa: PLC0415 (optional dependency)

    if not 0 < args.header_timeout <= 3600 or not 0 < args.body_timeout <= 3600:
        raise ConfigError("--header-timeout and --body-timeout take seconds from 0 to 3600")
    if not 1 <= args.keep_alive_timeout <= 3600:
        raise ConfigError("--keep-alive-timeout takes seconds from 1 to 3600")
    if args.max_connections < 1 or args.max_upload_mb < 1:
        raise ConfigError("--max-connections and --max-upload-mb must be at least 1")
    return Limits(
        header_timeout=args.header_timeout,
        keep_alive_timeout=args.keep_alive_timeout,
        body_timeout=args.body_timeout,
        max_connections=args.max_connections,
        max_upload_bytes=args.max_upload_mb * MiB,
    )


def load_keys(path: str | None) -> KeyRing:
    """The keys of ``--api-key-file`` (with their tenants and limits) and ``CAPSA_API_KEY``."""
    from capsa.server.tenants import key_ring, parse_key_file  # noqa: PLC0415 (server extra)

    keys: list[ApiKey] = []
    limits: dict[str, TenantLimits] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
            raise ConfigError(f"cannot read --api-key-file {path}: {reason}") from None
        numbered, limits = parse_key_file(text, path)
        keys = [key for _, key in numbered]
    return key_ring(keys, limits, os.environ.get("CAPSA_API_KEY", "").strip() or None)


class _NotItsScheme(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Uvicorn running on")


def _secrets(args: argparse.Namespace) -> ServerSecrets:
    from capsa.server.server_secrets import ServerSecrets  # noqa: PLC0415 (server extra)

    if args.ray is not None and args.secrets_file is not None:
        raise ConfigError(
            "--secrets-file is not supported with --ray",
            hint="a secret's value never leaves this process: it cannot go to a Ray node",
        )
    return ServerSecrets.load(args.secrets_file, tuple(args.upstream_ca))


def _serve(args: argparse.Namespace) -> int:
    if args.action == "ends":
        return _ends(args)
    try:
        import uvicorn  # noqa: PLC0415 (optional dependency)

        from capsa.server import ServerConfig, create_app  # noqa: PLC0415
        from capsa.server.http_guard import protocol_with  # noqa: PLC0415
    except ImportError as exc:
        raise ConfigError(
            f"capsa serve needs the server extra ({exc.name} is missing)",
            hint="pip install 'capsa[server]'",
        ) from None
    keys = load_keys(args.api_key_file)
    if not 0 < args.shutdown_timeout <= 3600:
        raise ConfigError("--shutdown-timeout takes seconds from 0 to 3600")
    if args.metrics_interval != 0 and not 0.5 <= args.metrics_interval <= 3600:
        raise ConfigError("--metrics-interval takes seconds from 0.5 to 3600 (0: off)")
    if not args.verbose:
        # the derived --max-sandboxes is logged at INFO
        logging.getLogger(sandbox_options.__module__).setLevel(logging.INFO)
    secure = args.tls is not None or args.tls_cert is not None
    domain = args.domain or f"{'capsa.localhost' if secure else 'localhost'}:{args.port}"
    context = tls_from(args, domain)
    config = ServerConfig(
        api_keys=keys,
        **sandbox_options(args),
        ray_address=args.ray,
        limits=limits_from(args),
        metrics_interval=args.metrics_interval,
        domain=domain,
        state_dir=state_dir(args),
        shutdown_timeout=args.shutdown_timeout,
        keep_ended=duration(args.keep_ended),
        volume_size_mb=check_size_mb(args.volume_size_mb),
        secrets=_secrets(args),
        ui=not args.no_ui,
        tls=secure,
    )
    if args.ray is not None:  # before uvicorn: its signal handlers must replace Ray's SIGTERM one
        from capsa.server import connect_driver  # noqa: PLC0415

        connect_driver(args.ray)
    server = create_app(config)
    if not logging.getLogger().handlers or not args.verbose:
        logging.getLogger("capsa.server").setLevel(logging.INFO)
    if context is not None:  # uvicorn's own line would say http://: the TLS is ours, not its
        logging.getLogger("uvicorn.error").addFilter(_NotItsScheme())
        log.info("serving HTTPS on https://%s:%d (hosts {port}-{id}.%s)", args.host, args.port, domain)
    try:
        uvicorn.run(
            server.app,
            host=args.host,
            port=args.port,
            log_level="info",
            access_log=False,  # capsa.server.access logs each request with its sandbox and duration
            timeout_graceful_shutdown=10,  # then the sandboxes pause (--shutdown-timeout)
            interface="asgi3",
            http=protocol_with(config.limits.header_timeout, tls=context),
            timeout_keep_alive=config.limits.keep_alive_timeout,
            limit_concurrency=config.limits.max_connections,
            h11_max_incomplete_event_size=config.limits.max_header_bytes,
        )
    except SystemExit as exc:
        # uvicorn re-raises the SIGTERM it shut down on; with --ray, Ray's handler turns it into
        # SystemExit(SIGTERM) after the sandboxes and host actors are already gone: a clean exit
        if args.ray is None or exc.code != signal.SIGTERM:
            raise
    return 0
