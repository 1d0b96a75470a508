"""``pdgate`` command line.

pdgate serve [--config FILE] [--host H] [--port P] [--log-level L]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from backends.errors import CatalogError
from gateway.policies import POLICIES
from gateway.settings import ConfigError, Settings, load_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pdgate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", type=Path, help="gateway YAML (default: the embedded one)")
    serve.add_argument("--host", help="bind address (overrides the config)")
    serve.add_argument("--port", type=int, help="port (overrides the config)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config, policies=set(POLICIES))
    except (ConfigError, CatalogError) as exc:
        print(f"pdgate: config error: {exc}", file=sys.stderr)
        return 2
    return _serve(settings, args)


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app

    server = settings.server.model_copy(
        update={
            k: v
            for k, v in {"host": args.host, "port": args.port, "log_level": args.log_level}.items()
            if v is not None
        }
    )
    settings = settings.model_copy(update={"server": server})
    logging.basicConfig(
        level=server.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    uvicorn.run(
        create_app(settings),
        host=server.host,
        port=server.port,
        loop="uvloop",
        http="httptools",
        log_level=server.log_level,
        access_log=server.access_log,
        timeout_graceful_shutdown=5,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
