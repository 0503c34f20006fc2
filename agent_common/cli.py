"""What every command line shares: one-line usage errors (exit 2), runtime failures (exit 1), one
log format.

    def main(argv=None) -> int:
        return run_command("edge-agent", lambda: dispatch(build_parser().parse_args(argv)))
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import NoReturn

from topics.errors import WireError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
LOG_LEVELS = ("debug", "info", "warning", "error")


class UsageError(Exception):
    """Bad arguments or configuration: one line on stderr, exit 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` instead of printing the usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def run_command(prog: str, body: Callable[[], int]) -> int:
    """Run ``body`` and turn its failures into one line on stderr and the exit code."""
    try:
        return body()
    except UsageError as exc:
        print(f"{prog}: error: {_first_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except (WireError, OSError, RuntimeError) as exc:
        print(f"{prog}: error: {_first_line(exc)}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED


class KeyValueFormatter(logging.Formatter):
    """``ts=... level=info logger=... node=cam1 msg="..."``: greppable, one event per line."""

    def __init__(self, node: str) -> None:
        super().__init__()
        self._node = node

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = (f"ts={stamp}.{int(record.msecs):03d}Z level={record.levelname.lower()} "
                f"logger={record.name} node={self._node} msg={json.dumps(record.getMessage())}")
        if record.exc_info:
            line += f" exc={json.dumps(self.formatException(record.exc_info))}"
        return line


def setup_logging(level: str, node: str) -> None:
    """Every log record to stderr in the one format of :class:`KeyValueFormatter`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter(node))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)


__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "LOG_LEVELS", "KeyValueFormatter", "OneLineParser",
           "UsageError", "run_command", "setup_logging"]
