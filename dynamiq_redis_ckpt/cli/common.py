"""What every command shares: the store options, the backend they build, exit codes, and output as a table (rich)
or as JSON (``--json``).

Exit codes (the README lists them):

====  ==================================================================================================
0     done
1     failed: the command ran and the outcome is not what was asked (a verification found a difference, ...)
2     bad input: unknown option, malformed JSON or id, a bad url or other configuration
3     refused: the store said no (the node has an answer already, the run holds a live lease, ...)
4     not found: no such checkpoint, run, flow or dead letter
5     Redis unreachable (refused, timed out, TLS handshake failed) after the configured retries
130   interrupted (Ctrl-C)
====  ==================================================================================================
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

OK, FAILED, BAD_INPUT, REFUSED, NOT_FOUND, UNREACHABLE, INTERRUPTED = 0, 1, 2, 3, 4, 5, 130


class CommandError(Exception):
    """A command's own error: its message goes to stderr, its ``code`` is the exit code."""

    def __init__(self, message: str, code: int = FAILED):
        super().__init__(message)
        self.code = code


class NotFound(CommandError):
    """Exit code 4: the checkpoint, run, flow or dead letter named does not exist."""

    def __init__(self, message: str):
        super().__init__(message, NOT_FOUND)


class BadInput(CommandError):
    """Exit code 2: malformed input (JSON, an id, a file)."""

    def __init__(self, message: str):
        super().__init__(message, BAD_INPUT)


class Refused(CommandError):
    """Exit code 3: the store refused the change."""

    def __init__(self, message: str):
        super().__init__(message, REFUSED)


def store_options(parser: argparse.ArgumentParser, *, json_output: bool = True) -> None:
    """--url, --prefix and the TLS files: every command that talks to Redis takes them; and --json, but for those
    that print no results (``worker``)."""
    parser.add_argument("--url", help="Redis url (default $DYNAMIQ_REDIS_CKPT_URL, else redis://localhost:6379/0)")
    parser.add_argument("--prefix", default=None, help="key namespace (default dynamiq:ckpt)")
    parser.add_argument("--ttl", type=_positive_float, default=None, metavar="SECONDS",
                        help="the namespace's retention, given to what this command writes (default "
                        f"${TTL_ENV}; unset: written checkpoints do not expire)")  # fmt: skip
    parser.add_argument("--tls-ca", help="rediss://: CA file the server's certificate must chain to "
                        "(default $DYNAMIQ_REDIS_CKPT_TLS_CA, else the system's CAs)")  # fmt: skip
    parser.add_argument("--tls-cert", help="rediss://: client certificate file (default $DYNAMIQ_REDIS_CKPT_TLS_CERT)")
    parser.add_argument("--tls-key", help="rediss://: client key file (default $DYNAMIQ_REDIS_CKPT_TLS_KEY)")
    if json_output:
        parser.add_argument("--json", action="store_true", help="print JSON (for scripts) instead of tables")


def page_options(parser: argparse.ArgumentParser, limit: int = 50) -> None:
    """--limit and --cursor: a listing prints one page and the cursor of the next (never a scan of the keyspace)."""
    parser.add_argument("--limit", type=_positive_int, default=limit, help=f"rows per page (default {limit})")
    parser.add_argument("--cursor", default="", help="where to go on: the 'next' cursor an earlier page printed")


TTL_ENV = "DYNAMIQ_REDIS_CKPT_TTL_SECONDS"
TRACEBACK_ENV = "DYNAMIQ_REDIS_CKPT_TRACEBACK"


def _env_ttl() -> float | None:
    import os

    value = os.environ.get(TTL_ENV)
    try:
        return _positive_float(value) if value else None
    except argparse.ArgumentTypeError as e:
        raise BadInput(f"${TTL_ENV} {e}") from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def connect(args: argparse.Namespace, **options):
    """The backend the options describe. Commands that only inspect or repair pass ``leases=False``. It spreads flows
    over the buckets the namespace recorded (``$DYNAMIQ_REDIS_CKPT_FLOW_BUCKETS`` when set), and writes with the
    namespace's retention when ``--ttl`` (``$DYNAMIQ_REDIS_CKPT_TTL_SECONDS``) says what it is."""
    import os

    from dynamiq_redis_ckpt.backend import RedisCheckpointBackend
    from dynamiq_redis_ckpt.config import BUCKETS_ENV

    if args.prefix:
        options["prefix"] = args.prefix
    if not os.environ.get(BUCKETS_ENV):
        options.setdefault("adopt_flow_buckets", True)
    ttl = getattr(args, "ttl", None) or _env_ttl()
    if ttl:
        options.setdefault("ttl_seconds", ttl)
    for option in ("tls_ca", "tls_cert", "tls_key"):
        if getattr(args, option, None):
            options[f"{option}_file"] = getattr(args, option)
    backend = RedisCheckpointBackend(url=args.url, **options)
    if options.get("adopt_flow_buckets"):
        backend.ping()  # runs the start-up check now: what reads the bucket count before Redis is asked sees it
    return backend


def run(handler: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run a command's handler and turn what it raises into a message on stderr and an exit code."""
    import os

    from dynamiq_redis_ckpt.errors import (
        CheckpointNotFoundError, CheckpointStoreError, ConfigurationError, StoreUnavailableError,
        WrongKeyTypeError)  # fmt: skip

    try:
        return handler(args) or OK
    except CommandError as e:
        _error(str(e))
        return e.code
    except StoreUnavailableError as e:
        _error(f"Redis unreachable: {e}")
        return UNREACHABLE
    except (ConfigurationError, json.JSONDecodeError) as e:
        _error(str(e))
        return BAD_INPUT
    except CheckpointNotFoundError as e:
        _error(str(e))
        return NOT_FOUND
    except WrongKeyTypeError as e:
        _error(f"refused: {e}")
        return REFUSED
    except KeyboardInterrupt:
        _error("interrupted")
        return INTERRUPTED
    except BrokenPipeError:  # `... | head`: the reader left; nothing more to say
        return OK
    except CheckpointStoreError as e:  # damaged data, an encryption key missing, ...: the message says which
        _error(f"{type(e).__name__}: {e}")
        return FAILED
    except Exception as e:  # a bug: one line for the operator, the traceback when asked for
        if os.environ.get(TRACEBACK_ENV):
            raise
        _error(f"unexpected {type(e).__name__}: {e} (set {TRACEBACK_ENV}=1 for the traceback)")
        return FAILED


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


@dataclass(frozen=True)
class Column:
    """One column of a table: the row field it shows, its heading, and how a value is shown (default ``str``)."""

    field: str
    heading: str
    show: Callable[[Any], str] | None = None
    justify: str = "left"


class Output:
    """Where a command prints: rich tables and text on a terminal or a pipe, or JSON with ``--json``.

    JSON is one document per command: a listing is ``{"items": [...], "next": cursor-or-null}``, a single thing
    is its object. Rows are plain dicts whose values JSON can hold (times as epoch seconds, sizes in bytes); tables
    format them for people."""

    def __init__(self, args: argparse.Namespace, file=None):
        self.json = bool(getattr(args, "json", False))
        self.file = file or sys.stdout
        self._console = None

    @property
    def console(self):
        """The rich console (created on first use; no colour codes when the output is not a terminal)."""
        if self._console is None:
            from rich.console import Console

            self._console = Console(file=self.file, soft_wrap=False, width=_width(self.file))
        return self._console

    def table(self, columns: Sequence[Column], rows: Iterable[dict], *, title: str | None = None,
              next_cursor: str | None = None, empty: str = "nothing found") -> None:  # fmt: skip
        """A listing: a table (and how to get the next page), or JSON ``{"items", "next"}``."""
        rows = list(rows)
        if self.json:
            self.document({"items": rows, "next": next_cursor or None})
            return
        if not rows:
            self.console.print(empty)
        else:
            from rich.table import Table

            table = Table(title=title, box=_box(), header_style="bold", show_edge=False)
            for c in columns:
                table.add_column(c.heading, justify=c.justify, overflow="fold")
            for row in rows:
                table.add_row(*[_cell((c.show or _plain)(row.get(c.field))) for c in columns])
            self.console.print(table)
        if next_cursor:
            self.console.print(f"next page: --cursor {next_cursor}", style="dim", highlight=False, markup=False)

    def fields(self, record: dict, labels: dict[str, str] | None = None,
               show: dict[str, Callable[[Any], str]] | None = None) -> None:  # fmt: skip
        """One thing, field by field: two columns for people, its object in JSON."""
        if self.json:
            self.document(record)
            return
        from rich.table import Table

        table = Table(box=None, show_header=False, pad_edge=False)
        table.add_column(style="bold")
        table.add_column(overflow="fold")
        for name, value in record.items():
            shown = (show or {}).get(name, _plain)(value)
            table.add_row(_cell((labels or {}).get(name, name)), _cell(shown))
        self.console.print(table)

    def document(self, value: Any) -> None:
        """``value`` as JSON, one document."""
        json.dump(value, self.file, indent=2, default=str, ensure_ascii=False)
        self.file.write("\n")

    def say(self, text: str) -> None:
        """A line for people (printed as ``{"message": ...}`` with --json)."""
        if self.json:
            self.document({"message": text})
        else:
            self.console.print(text, highlight=False, markup=False)


def _width(file) -> int | None:
    return None if getattr(file, "isatty", lambda: False)() else 200  # a pipe: wide enough to keep rows whole


def _box():
    from rich import box

    return box.SIMPLE_HEAD


def _cell(value: Any):
    """A table cell as plain text: ids and values are never read as rich markup ('[red]' stays as it is)."""
    from rich.text import Text

    return value if not isinstance(value, str) else Text(value)


def _plain(value: Any) -> str:
    if value is None:
        return "-"
    return str(value)


def size(n: int | None) -> str:
    """Bytes for people: 512 B, 3.4 KiB, 12.0 MiB."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def age(epoch_seconds: float | None, now: float | None = None) -> str:
    """How long ago (or, for a future moment, how soon): 42s, 3m, 5h, 2d ago; in 10s."""
    if epoch_seconds is None:
        return "-"
    delta = (now if now is not None else time.time()) - epoch_seconds
    text = span(abs(delta))
    return f"{text} ago" if delta >= 0 else f"in {text}"


def span(seconds: float) -> str:
    """A length of time for people: 4.2s under a minute, then whole minutes, hours or days (3m, 5h, 2d)."""
    seconds = abs(seconds)
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{int(seconds // length)}{unit}"
    return f"{seconds:.1f}s"
