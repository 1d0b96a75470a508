"""``pdgate serve``: run the gateway under uvicorn (uvloop + httptools)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from backends.errors import CatalogError
from gateway.logs import configure_logging
from gateway.policies import POLICIES
from gateway.settings import ConfigError, load_settings


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="gateway YAML (default: the embedded one)")
    parser.add_argument("--host", help="bind address (overrides the config)")
    parser.add_argument("--port", type=int, help="port (overrides the config)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    parser.add_argument(
        "--log-format", choices=["text", "json"], help="json: JSON lines with the request id"
    )


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config, policies=set(POLICIES))
    except (ConfigError, CatalogError) as exc:
        print(f"pdgate: config error: {exc}", file=sys.stderr)
        return 2
    overrides = {
        "host": args.host,
        "port": args.port,
        "log_level": args.log_level,
        "log_format": args.log_format,
    }
    server = settings.server.model_copy(
        update={k: v for k, v in overrides.items() if v is not None}
    )
    settings = settings.model_copy(update={"server": server})

    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    from backends.server.guard import guarded_protocol
    from gateway.app import create_app, settle_heap

    configure_logging(server.log_level, server.log_format)
    uvicorn.run(
        create_app(settings, after_start=settle_heap),
        host=server.host,
        port=server.port,
        loop="uvloop",
        http=guarded_protocol(  # httptools, with header and body read deadlines
            header_timeout_s=server.header_timeout_s, body_timeout_s=server.body_timeout_s
        ),
        log_level=server.log_level,
        access_log=server.access_log,
        timeout_graceful_shutdown=5,
        # JSON lines: uvicorn's loggers propagate to the root handler instead of its own.
        log_config=None if server.log_format == "json" else LOGGING_CONFIG,
    )
    return 0
