"""Run the simulator as a server.

    python -m simulator --host 127.0.0.1 --port 0 [--config-json '{...}'] [--api-key K] [--duration S]

Prints exactly one line, `SIMULATOR LISTENING http://<host>:<port>`, once the socket is bound (so callers
using port 0 learn the port), then serves until SIGTERM or SIGINT and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Callable, Sequence

from aiohttp import web
from pydantic import ValidationError

from genq.simulator.app import build_app
from genq.simulator.config import Duration, SimConfig

LISTENING_PREFIX = "SIMULATOR LISTENING "
# Short so that a stop never waits long on a slow-drip download still in flight.
_SHUTDOWN_TIMEOUT = 2.0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m simulator", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--config-json", default=None, help="SimConfig fields as a JSON object")
    parser.add_argument("--api-key", default=None, help="shortcut for config api_key")
    parser.add_argument("--duration", type=float, default=None, help="shortcut: fixed job duration (s)")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> SimConfig:
    """Build the config; raises ValueError (JSON) or pydantic ValidationError on bad input."""
    fields: object = json.loads(args.config_json) if args.config_json else {}
    if not isinstance(fields, dict):
        raise ValueError("--config-json must be a JSON object")
    config = SimConfig.model_validate(fields)
    shortcuts: dict[str, object] = {}
    if args.api_key is not None:
        shortcuts["api_key"] = args.api_key
    if args.duration is not None:
        shortcuts["duration"] = Duration(kind="fixed", value=args.duration).model_dump()
    return config.merged(shortcuts) if shortcuts else config


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def serve(
    config: SimConfig,
    host: str = "127.0.0.1",
    port: int = 0,
    ready_callback: Callable[[str], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until `stop` is set (forever without one); `ready_callback(url)` runs once bound."""
    runner = web.AppRunner(
        build_app(config), access_log=None, handle_signals=False, shutdown_timeout=_SHUTDOWN_TIMEOUT
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=1024)
        await site.start()
        bound_port = int(runner.addresses[0][1])
        if ready_callback is not None:
            ready_callback(_url(host, bound_port))
        await (stop or asyncio.Event()).wait()
    finally:
        await runner.cleanup()


def run(
    config: SimConfig,
    host: str = "127.0.0.1",
    port: int = 0,
    ready_callback: Callable[[str], None] | None = None,
) -> None:
    """Blocking: serve until SIGTERM or SIGINT, then shut down cleanly."""

    async def _main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(config, host, port, ready_callback, stop)

    asyncio.run(_main())


def _announce(url: str) -> None:
    sys.stdout.write(f"{LISTENING_PREFIX}{url}\n")
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = config_from_args(args)
    except (ValueError, ValidationError) as exc:
        print(f"simulator: invalid configuration: {exc}", file=sys.stderr)
        return 2
    try:
        run(config, args.host, args.port, _announce)
    except OSError as exc:
        print(f"simulator: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
