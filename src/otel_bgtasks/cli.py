"""The ``otel-bgtasks`` command: inspect, replay and purge dead letters.

::

    otel-bgtasks [--store URL] [--tasks MODULE[,MODULE]] dlq list [--task T] [--reason R]
                                        [--since 2h|ISO] [--limit N] [--json [--full]]
    otel-bgtasks dlq show ID [--full | --json]
    otel-bgtasks dlq delete ID [ID ...]
    otel-bgtasks dlq replay (ID [ID ...] | --all [--task T] [--reason R] [--since S])
    otel-bgtasks dlq adopt (ID [ID ...] | --all) [--yes]
    otel-bgtasks dlq purge [--task T] [--reason R] [--since S] [--yes]
    otel-bgtasks recover [--rerun] [--stale-after SECONDS]
    otel-bgtasks demo [ARGS ...]

The store URL comes from ``--store`` (accepted before or after the subcommand), else from the
``OTEL_BGTASKS_DLQ_URL`` environment variable. The app's tasks come from the modules given by
``--tasks`` (else ``OTEL_BGTASKS_TASK_MODULES``), imported on purpose: replay and recover run
only those (see `otel_bgtasks.registry`), and never import a module an entry names; they are
found from the current directory first, as with Celery's ``-A``. With
``OTEL_BGTASKS_SIGNING_KEY`` set, entries whose signature does not verify are refused;
``dlq adopt`` shows them and, after review, signs them with the current key. ``list`` and
``show`` read each payload's first 1,000 characters and its size only (its digest, to check
a signature, is streamed): the whole payload only with ``--full`` or ``show --json``, streamed.
Everything printed from an entry has its control characters escaped. An ID may be abbreviated
to a unique prefix of at least 4 characters. Exit status: 0 success; 1 some replays (or re-runs)
did not succeed, or an entry listed or shown is refused;
2 an error (bad arguments, unknown id, store unreachable), reported on stderr without a
traceback. Results go to stdout, everything else (progress, warnings, logs) to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import functools
import hashlib
import importlib
import inspect
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from otel_bgtasks._execution import Executor, active_executor, standalone_executor
from otel_bgtasks._json import dumps_streamed
from otel_bgtasks._terminal import printable
from otel_bgtasks.calls import check_replayable
from otel_bgtasks.errors import (
    ConfigurationError,
    ConsumedEntryError,
    CorruptEntryError,
    StoreUnavailableError,
    UntrustedEntryError,
)
from otel_bgtasks.records import PREVIEW_CHARS, DeadLetter, DeadLetterPreview, DeadLetterReason
from otel_bgtasks.recovery import recover_interrupted_tasks
from otel_bgtasks.registry import TASK_MODULES_ENV, declare_task_modules, declared_task_modules
from otel_bgtasks.replay import (
    DeadLetters,
    ReplayOutcome,
    ReplayRunner,
    ReplayStatus,
    run_dead_letter,
)
from otel_bgtasks.routes import dispatcher_for
from otel_bgtasks.signing import (
    SIGNING_KEY_ENV,
    SigningKeys,
    new_nonce,
    payload_digest,
    signing_keys,
    signing_override,
)
from otel_bgtasks.stores import DLQ_URL_ENV, default_store_path, default_store_url, open_store
from otel_bgtasks.stores.base import DeadLetterStore
from otel_bgtasks.telemetry import configure_telemetry

__all__ = ["main"]

PROG = "otel-bgtasks"
_MIN_PREFIX = 4
_SHORT_ID = 12


class CLIError(Exception):
    """A user-facing error: printed on stderr, exit status 2."""


@dataclass(slots=True)
class _Context:
    args: argparse.Namespace
    environ: Mapping[str, str]
    runner: ReplayRunner | None
    stdout: TextIO
    out: Console
    err: Console

    _store: DeadLetterStore | None = None

    def store(self) -> DeadLetterStore:
        if self._store is None:
            self._store = _open(getattr(self.args, "store", None), self.environ)
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()


Handler = Callable[[_Context], int]


# -- argument parsing -------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, *, now: float | None = None) -> float:
    """An epoch time from a duration ago (``30s``, ``5m``, ``2h``, ``7d``, ``1w``) or an ISO
    8601 date/time (naive means local time).

    Raises:
        argparse.ArgumentTypeError: neither form.
    """
    match = _DURATION.match(text)
    if match:
        return (time.time() if now is None else now) - float(match[1]) * _UNITS[match[2]]
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid time {text!r}: use a duration (30s, 5m, 2h, 7d, 1w) or an ISO date/time"
            " (2024-05-01 or 2024-05-01T12:00:00Z)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.astimezone()  # local time, as the operator typed it
    return moment.timestamp()


def _reason(text: str) -> DeadLetterReason:
    try:
        return DeadLetterReason(text)
    except ValueError:
        valid = ", ".join(r.value for r in DeadLetterReason)
        raise argparse.ArgumentTypeError(f"invalid reason {text!r}: use one of {valid}") from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _store_option() -> argparse.ArgumentParser:
    # SUPPRESS: a --store given before the subcommand is not overwritten by the default of
    # the subcommand's copy of the option.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--store",
        metavar="URL",
        default=argparse.SUPPRESS,
        help=f"dead-letter store URL (default: ${DLQ_URL_ENV}), e.g. sqlite:////var/lib/app/dlq.db"
        " or redis://localhost:6379/0",
    )
    common.add_argument(
        "--tasks",
        metavar="MODULE[,MODULE]",
        default=argparse.SUPPRESS,
        help=f"modules holding the app's tasks, imported on purpose (default: ${TASK_MODULES_ENV});"
        " replay and recover run only their tasks",
    )
    return common


def _filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", metavar="NAME", help="only entries of this task name")
    parser.add_argument(
        "--reason",
        type=_reason,
        metavar="REASON",
        help=f"only this reason: {', '.join(r.value for r in DeadLetterReason)}",
    )
    parser.add_argument(
        "--since",
        type=parse_since,
        metavar="WHEN",
        help="only entries whose last failure is at or after WHEN (2h, 30m, 7d or ISO time)",
    )


def _add_dlq(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = _store_option()
    dlq = sub.add_parser("dlq", parents=[common], help="inspect, replay and purge dead letters")
    commands = dlq.add_subparsers(dest="dlq_command", metavar="COMMAND", required=True)

    p = commands.add_parser("list", parents=[common], help="list dead letters, oldest first")
    _filters(p)
    p.add_argument("--limit", type=_positive, metavar="N", help="at most N entries")
    p.add_argument(
        "--json",
        action="store_true",
        help="JSON array on stdout; each payload cut to its first"
        f" {PREVIEW_CHARS:,} characters, with payload_size and payload_truncated",
    )
    p.add_argument("--full", action="store_true", help="with --json: whole payloads, streamed")
    p.set_defaults(handler=_cmd_list)

    p = commands.add_parser("show", parents=[common], help="one entry with its traceback")
    p.add_argument("id", help="entry id (or a unique prefix)")
    p.add_argument(
        "--json", action="store_true", help="JSON object on stdout (the whole payload, streamed)"
    )
    p.add_argument(
        "--full",
        action="store_true",
        help=f"the whole payload (streamed) instead of its first {PREVIEW_CHARS:,} characters",
    )
    p.set_defaults(handler=_cmd_show)

    p = commands.add_parser(
        "adopt",
        parents=[common],
        help="show entries that do not verify with the current key (unsigned, another key,"
        " an older scheme, already ran) and sign them with it after review",
    )
    p.add_argument("ids", nargs="*", metavar="ID", help="entry ids (or unique prefixes)")
    p.add_argument("--all", action="store_true", help="every entry that does not verify")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    p.set_defaults(handler=_cmd_adopt)

    p = commands.add_parser("delete", parents=[common], help="delete entries (corrupt ones too)")
    p.add_argument("ids", nargs="+", metavar="ID", help="entry ids (or unique prefixes)")
    p.set_defaults(handler=_cmd_delete)

    p = commands.add_parser(
        "replay",
        parents=[common],
        help="run entries again; succeeded ones are deleted, failed ones updated",
    )
    p.add_argument("ids", nargs="*", metavar="ID", help="entry ids (or unique prefixes)")
    p.add_argument("--all", action="store_true", help="every entry matching the filters")
    p.add_argument(
        "--traceback",
        action="store_true",
        help="print each new failure's traceback under its line",
    )
    p.add_argument(
        "--celery-app",
        metavar="MODULE:APP",
        help="the Celery app (imported on purpose): dead letters of Celery tasks are sent back"
        " to their queue and run on a worker (needs otel-bgtasks[celery])",
    )
    _filters(p)
    p.set_defaults(handler=_cmd_replay)

    p = commands.add_parser("purge", parents=[common], help="delete entries matching filters")
    _filters(p)
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    p.set_defaults(handler=_cmd_purge)


def _add_recover(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "recover",
        parents=[_store_option()],
        help="durable tasks of dead processes: dead-letter them (default) or --rerun them",
    )
    p.add_argument(
        "--rerun",
        action="store_true",
        help="run them again now (a failure is dead-lettered) instead of dead-lettering them",
    )
    p.add_argument(
        "--stale-after",
        type=_positive_float,
        default=60.0,
        metavar="SECONDS",
        help="a process on another host is dead after this long without a heartbeat"
        " (default: 60); on this host, a process is dead as soon as its pid is gone",
    )
    p.set_defaults(handler=_cmd_recover)


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="run the demo application", add_help=False, prefix_chars="\0")
    p.add_argument("demo_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(handler=_cmd_demo)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = [
    _add_dlq,
    _add_recover,
    _add_demo,
]
"""Each adds one top-level subcommand, setting ``handler`` (``(_Context) -> int``) as default."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        parents=[_store_option()],
        description="Dead letters of otel-bgtasks background tasks, and the demo.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


# -- entry point ------------------------------------------------------------------------------


def main(
    argv: Sequence[str] | None = None,
    *,
    runner: ReplayRunner | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    """Run the CLI; returns the exit status.

    Args:
        argv: arguments without the program name (default: ``sys.argv[1:]``).
        runner: replays one entry (default: ``otel_bgtasks.replay.run_dead_letter``).
        environ: environment for ``OTEL_BGTASKS_DLQ_URL`` (default: ``os.environ``).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else 2
    ctx = _Context(
        args=args,
        environ=os.environ if environ is None else environ,
        runner=runner,
        stdout=sys.stdout,
        out=Console(file=sys.stdout, highlight=False),
        err=Console(file=sys.stderr, highlight=False),
    )
    handler: Handler = args.handler
    try:
        # stdout carries results only (``--json`` must parse): whatever else prints there
        # (structlog's default logger, the task modules imported) goes to stderr.
        with contextlib.redirect_stdout(sys.stderr), signing_override(_keys(ctx.environ)):
            _declare_tasks(ctx)
            return handler(ctx)
    except (CLIError, StoreUnavailableError, ConfigurationError) as exc:
        print(f"{PROG}: error: {printable(str(exc))}", file=sys.stderr)
        return 2
    finally:
        ctx.close()


def _keys(environ: Mapping[str, str]) -> SigningKeys | None:
    value = environ.get(SIGNING_KEY_ENV, "")
    return SigningKeys.of(value) if value.strip() else None


def _declare_tasks(ctx: _Context) -> None:
    """Import the app's task modules: --tasks, else $OTEL_BGTASKS_TASK_MODULES.

    They are found from the current directory, as Celery's ``-A`` and ``python -m`` find
    them: run the command from the project directory (a console script's ``sys.path`` starts
    with its own bin directory, not the working directory).
    """
    modules = getattr(ctx.args, "tasks", None) or ctx.environ.get(TASK_MODULES_ENV, "")
    if modules.strip():
        cwd = os.getcwd()
        if cwd not in sys.path and "" not in sys.path:
            sys.path.insert(0, cwd)
        declare_task_modules(modules)


def _open(url: str | None, environ: Mapping[str, str]) -> DeadLetterStore:
    url = url or environ.get(DLQ_URL_ENV) or None
    if url is None:  # the store an app instrumented without settings writes to
        default = default_store_path()
        if not default.exists():
            raise CLIError(
                f"no dead-letter store: pass --store URL or set {DLQ_URL_ENV}"
                " (e.g. sqlite:////var/lib/app/dlq.db or redis://localhost:6379/0); the default"
                f" store {str(default)!r} does not exist (no dead letter was stored there yet)"
            )
        url = default_store_url()
    if url.lower().startswith("sqlite:///"):
        path = url[len("sqlite:///") :]
        if path and not os.path.exists(path):
            hint = (
                ""
                if os.path.isabs(path)
                else f" (relative to {os.getcwd()!r}; an absolute path takes four slashes:"
                f" sqlite:////{path})"
            )
            raise CLIError(f"dead-letter store {url!r}: file {path!r} does not exist{hint}")
    try:
        return open_store(url, buffered=False)
    except (ValueError, ImportError) as exc:  # a bad URL; a Redis URL without the extra
        raise CLIError(str(exc)) from None


# -- helpers ----------------------------------------------------------------------------------


def _timestamp(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def _digest(store: DeadLetterStore, preview: DeadLetterPreview) -> str:
    """The SHA-256 of the entry's whole payload, streamed when only a preview is at hand."""
    if not preview.truncated:
        return payload_digest(preview.entry.payload)
    digest = hashlib.sha256()
    for chunk in store.payload_chunks(preview.entry.id):
        digest.update(chunk)
    return digest.hexdigest()


def _verdicts(
    store: DeadLetterStore, previews: list[DeadLetterPreview], *, check_function: bool
) -> list[tuple[str, str]]:
    """For each entry ("ok" | "refused" | "not replayable" | "-", why): what a replay here
    would do, without reading any payload whole (its digest is streamed).

    The signature is checked when a key is set, the nonce against those the store remembers
    as consumed, the function only when task modules are declared (without them, no
    function is a task here and the check says nothing).
    """
    keys = signing_keys()
    consumed = store.consumed([p.entry.nonce for p in previews])
    out: list[tuple[str, str]] = []
    for preview in previews:
        entry = preview.entry
        try:
            digest = _digest(store, preview) if keys is not None else None
            if keys is not None:
                entry.verify_signature(keys, payload_sha256=digest)
            if entry.nonce in consumed:
                raise ConsumedEntryError(entry.id, consumed[entry.nonce])
            if check_function:
                check_replayable(entry, payload_sha256=digest)
        except UntrustedEntryError as exc:
            out.append(("refused", str(exc)))
            continue
        except LookupError as exc:
            out.append(("not replayable", str(exc)))
            continue
        out.append(("ok" if keys is not None or check_function else "-", ""))
    return out


def _entries_table(
    entries: Sequence[DeadLetter], width: int, verdicts: list[tuple[str, str]]
) -> Table:
    """One line per entry; task, function and error share what the fixed columns leave (the
    last failure time only on terminals 120 columns wide or more)."""
    with_time = width >= 120
    headers = ["ID", "Task", "Function", "Reason", "Tries", "Check", "Error"]
    if with_time:
        headers.insert(5, "Last failure UTC")
    rows: list[list[str]] = []
    for e, (check, _) in zip(entries, verdicts, strict=True):
        error = f"{e.error_type}: {e.error_message}" if e.error_type else e.error_message
        first_line = error.splitlines()[0] if error else ""
        row = [
            printable(e.id[:_SHORT_ID]),
            printable(e.task_name),
            printable(e.func_ref) or "-",
            e.reason.value,
            str(e.attempts),
            check,
            printable(first_line),
        ]
        if with_time:
            row.insert(5, _timestamp(e.last_failure).rstrip("Z"))
        rows.append(row)

    def longest(i: int) -> int:
        return max(len(headers[i]), *(len(r[i]) for r in rows))

    shared = (1, 2, len(headers) - 1)  # task, function, error
    widths = [longest(i) for i in range(len(headers))]
    free = width - sum(w for i, w in enumerate(widths) if i not in shared)
    free -= 2 * (len(headers) - 1) + 1
    widths[1] = max(min(widths[1], 40, free // 4), 8)
    widths[2] = max(min(widths[2], 60, free // 3), 8)
    widths[-1] = max(min(widths[-1], free - widths[1] - widths[2]), 5)
    table = Table(
        title=f"{len(entries)} dead letter{'s' if len(entries) != 1 else ''}",
        box=None,
        pad_edge=False,
        header_style="bold",
        title_justify="left",
    )
    for header, col_width in zip(headers, widths, strict=True):
        table.add_column(
            header,
            no_wrap=True,
            width=col_width,
            justify="right" if header == "Tries" else "left",
        )
    check_column = headers.index("Check")
    for row in rows:
        cells = [Text(_clip(value, widths[i])) for i, value in enumerate(row)]
        if row[check_column] == "refused":
            cells[check_column].stylize("bold red")
        table.add_row(*cells)
    return table


def _resolve_id(store: DeadLetterStore, ident: str) -> str:
    """The full id for `ident` (an id or a unique prefix); corrupt rows count as existing."""
    try:
        if store.preview(ident, chars=0) is not None:  # no payload read
            return ident
    except CorruptEntryError:
        return ident
    if len(ident) >= _MIN_PREFIX:
        known = [p.entry.id for p in store.previews(chars=0)] + store.corrupt_ids()
        matches = sorted({i for i in known if i.startswith(ident)})
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise CLIError(f"id prefix {ident!r} is ambiguous: {', '.join(matches)}")
    if len(ident) < _MIN_PREFIX:
        raise CLIError(
            f"no dead letter with id {ident!r}: an abbreviated id needs at least {_MIN_PREFIX}"
            f" characters (see: {PROG} dlq list)"
        )
    raise CLIError(f"no dead letter with id {ident!r} (see: {PROG} dlq list)")


def _report_corrupt(ctx: _Context, store: DeadLetterStore) -> None:
    bad = store.corrupt_ids()
    if bad:
        noun = "entry" if len(bad) == 1 else "entries"
        ctx.err.print(
            Text(
                f"warning: {len(bad)} corrupt {noun} skipped: {printable(', '.join(bad))}"
                f" (inspect with '{PROG} dlq show ID', remove with '{PROG} dlq delete ID')",
                style="yellow",
            )
        )


def _filter_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"task": args.task, "reason": args.reason, "since": args.since}


# -- commands ---------------------------------------------------------------------------------


def _cmd_list(ctx: _Context) -> int:
    args = ctx.args
    store = ctx.store()
    chars = PREVIEW_CHARS if args.json and not args.full else 0
    previews = store.previews(**_filter_kwargs(args), limit=args.limit, chars=chars)
    entries = [p.entry for p in previews]
    verdicts = _verdicts(store, previews, check_function=bool(declared_task_modules()))
    if args.json:
        ctx.stdout.write("[")
        for n, (preview, (check, why)) in enumerate(zip(previews, verdicts, strict=True)):
            ctx.stdout.write(",\n" if n else "\n")
            listed = {**preview.to_dict(), "check": check, "check_reason": why}
            if args.full:
                _write_full_json(ctx.stdout, store, listed)
            else:
                ctx.stdout.write(json.dumps(listed, indent=2))
        ctx.stdout.write("\n]\n" if previews else "]\n")
    elif not entries:
        ctx.out.print("No dead letters.")
    else:
        ctx.out.print(_entries_table(entries, ctx.out.width, verdicts))
        ctx.out.print(
            Text("IDs are shortened: a unique prefix works; --json gives full ids", style="dim")
        )
    _report_corrupt(ctx, store)
    return _report_refused(ctx, entries, verdicts)


def _write_full_json(out: TextIO, store: DeadLetterStore, fields: dict[str, Any]) -> None:
    """`fields` as an indented JSON object whose ``payload`` is the entry's whole payload,
    streamed from the store chunk by chunk (never whole in memory)."""
    fields = {k: v for k, v in fields.items() if k not in ("payload", "payload_truncated")}
    for piece in dumps_streamed(fields, "payload", store.payload_chunks(fields["id"]), indent=2):
        out.write(piece)


def _write_full_payload(out: TextIO, store: DeadLetterStore, entry_id: str) -> None:
    """The whole payload on `out`, streamed, control characters escaped."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    for chunk in store.payload_chunks(entry_id):
        out.write(printable(decoder.decode(chunk), multiline=True))
    out.write(printable(decoder.decode(b"", final=True), multiline=True) + "\n")


def _report_refused(
    ctx: _Context, entries: Sequence[DeadLetter], verdicts: list[tuple[str, str]]
) -> int:
    """One stderr line per refused entry with the function it names and why; 1 if any."""
    pairs = zip(entries, verdicts, strict=True)
    refused = [(e, why) for e, (check, why) in pairs if check == "refused"]
    for entry, why in refused:
        ctx.err.print(
            Text(
                f"refused: {printable(entry.id)} runs {printable(entry.func_ref) or '-'}: "
                f"{printable(why)}",
                style="red",
            )
        )
    return 1 if refused else 0


def _size(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit} ({size:,} bytes)"
    return f"{size} bytes"


def _cmd_show(ctx: _Context) -> int:
    store = ctx.store()
    entry_id = _resolve_id(store, ctx.args.id)
    try:
        preview = store.preview(entry_id)
    except CorruptEntryError as exc:
        raise CLIError(f"{exc}; remove it with '{PROG} dlq delete {entry_id}'") from None
    if preview is None:  # deleted meanwhile
        raise CLIError(f"no dead letter with id {entry_id!r}")
    entry = preview.entry
    ((check, why),) = _verdicts(store, [preview], check_function=bool(declared_task_modules()))
    status = 1 if check == "refused" else 0
    if ctx.args.json:  # the whole entry, its payload streamed
        _write_full_json(
            ctx.stdout, store, {**entry.to_dict(), "check": check, "check_reason": why}
        )
        ctx.stdout.write("\n")
        return status
    size = _size(preview.payload_size)
    if preview.truncated and not ctx.args.full:
        size += f", the first {len(entry.payload):,} characters shown (--full: all of it)"
        payload = entry.payload + "…"
    elif preview.truncated:
        payload = "(below)"
    else:
        payload = entry.payload
    table = Table(show_header=False, box=None)
    table.add_column("field", style="bold", no_wrap=True)
    table.add_column("value", overflow="fold")
    rows: list[tuple[str, str]] = [
        ("id", entry.id),
        ("task", entry.task_name),
        ("function", entry.func_ref or "(not importable: cannot be replayed)"),
        ("check", f"{check}: {why}" if why else check),
        ("reason", entry.reason.value),
        ("attempts", str(entry.attempts)),
        ("first failure", _timestamp(entry.first_failure)),
        ("last failure", _timestamp(entry.last_failure)),
        ("error", f"{entry.error_type}: {entry.error_message}"),
        ("category", entry.category),
        ("trace id", entry.trace_id or "-"),
        ("span id", entry.span_id or "-"),
        ("serializer", entry.serializer),
        ("payload size", size),
        ("payload", payload),
        ("signature", entry.signature or "-"),
    ]
    for name, value in rows:
        table.add_row(name, Text(printable(value)))
    ctx.out.print(table)
    if entry.traceback:
        ctx.out.print(Text("traceback:", style="bold"))
        ctx.out.print(Text(printable(entry.traceback.rstrip(), multiline=True)), soft_wrap=True)
    if preview.truncated and ctx.args.full:
        ctx.out.print(Text("payload:", style="bold"))
        ctx.out.file.flush()
        _write_full_payload(ctx.stdout, store, entry.id)
    return status


def _cmd_adopt(ctx: _Context) -> int:
    """Sign, after review, entries the current key does not verify (written before a key
    was set, with a retired key, with the v1 scheme, or a copy of one that already ran):
    each gets a fresh nonce and a signature by the first key."""
    args = ctx.args
    keys = signing_keys()
    if keys is None:
        raise CLIError(f"adopt signs with the current key: set {SIGNING_KEY_ENV}")
    if args.all == bool(args.ids):
        raise CLIError("give entry ids or --all (not both)")
    store = ctx.store()
    if args.ids:
        found = [store.preview(_resolve_id(store, ident)) for ident in dict.fromkeys(args.ids)]
        previews = [p for p in found if p is not None]
    else:
        previews = store.previews()
    verdicts = _verdicts(store, previews, check_function=False)
    pending = [(p, why) for p, (check, why) in zip(previews, verdicts, strict=True) if why]
    if not pending:
        ctx.out.print("nothing to adopt: every entry verifies")
        return 0
    for preview, why in pending:
        entry = preview.entry
        call = _clip(entry.payload, 200) + ("…" if preview.truncated else "")
        ctx.out.print(
            Text(
                f"{printable(entry.id)}  {printable(entry.task_name)}"
                f"  {printable(entry.func_ref) or '-'}\n"
                f"  payload ({_size(preview.payload_size)}): {printable(call)}\n"
                f"  {printable(why)}"
            )
        )
    noun = f"{len(pending)} entr{'ies' if len(pending) != 1 else 'y'}"
    if not args.yes:
        if not sys.stdin.isatty():
            raise CLIError(f"refusing to sign {noun} without --yes (stdin is not a terminal)")
        answer = input(f"sign {noun} with the current key, to be replayed? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            ctx.out.print("adopt cancelled")
            return 0
    signed = 0
    for preview, _ in pending:
        whole = store.get(preview.entry.id)
        if whole is None:  # deleted meanwhile
            continue
        store.update(whole.replace(nonce=new_nonce(), signature="").signed(keys))
        signed += 1
    ctx.out.print(f"signed {signed} entr{'ies' if signed != 1 else 'y'} with the current key")
    return 0


def _cmd_delete(ctx: _Context) -> int:
    store = ctx.store()
    ids = [_resolve_id(store, ident) for ident in ctx.args.ids]  # all known before deleting any
    deleted = sum(store.delete(entry_id) for entry_id in dict.fromkeys(ids))
    ctx.out.print(f"deleted {deleted} dead letter{'s' if deleted != 1 else ''}")
    return 0


def _executor(store: DeadLetterStore, *, same_store: bool = False) -> Executor:
    """The executor replays (and, with `same_store`, re-runs that dead-letter into `store`)
    go through: the app's when instrumented in this process, else a standalone one for this
    invocation, configured by the ``OTEL_BGTASKS_*`` variables (its redaction, retry,
    timeout... as the app would have them)."""
    active = active_executor()
    if active is not None and (not same_store or active.store is store):
        return active
    return standalone_executor(store)


_OTLP_VARS = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
)


@contextlib.contextmanager
def _exported(ctx: _Context) -> Iterator[None]:
    """Replays and re-runs are task runs: with an OTLP endpoint set, export them like the app's.

    Nothing is set up when an SDK tracer provider already exists (a task module configured
    one) or when no endpoint is configured (there would be nowhere to send to).
    """
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    if isinstance(trace.get_tracer_provider(), TracerProvider) or not any(
        ctx.environ.get(var) for var in _OTLP_VARS
    ):
        yield
        return
    telemetry = configure_telemetry(service_name=PROG, export=True)
    try:
        yield
    finally:
        telemetry.shutdown()  # flush before the process exits


def _cmd_replay(ctx: _Context) -> int:
    args = ctx.args
    filtered = args.task is not None or args.reason is not None or args.since is not None
    if args.all and args.ids:
        raise CLIError("give entry ids or --all, not both")
    if not args.all and not args.ids:
        raise CLIError("nothing to replay: give entry ids or --all (with optional filters)")
    if args.ids and filtered:
        raise CLIError("--task, --reason and --since select entries for --all only")
    store = ctx.store()
    ids = [_resolve_id(store, ident) for ident in args.ids] if args.ids else None
    dead_letters = DeadLetters(
        store, redact_exception_messages=_executor(store).redact_exception_messages
    )
    if args.celery_app:
        _celery_routes(args.celery_app, store)

    progress = Progress(
        TextColumn("replaying"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=ctx.err,
        transient=True,
    )
    task_id = progress.add_task("replay", total=None)
    stopped: list[ReplayOutcome] = []  # the entries an open circuit kept from running

    def started(total: int) -> None:
        progress.update(task_id, total=total)

    def advanced(outcome: ReplayOutcome) -> None:
        progress.advance(task_id)
        if outcome.status == "not_run":
            if not stopped:  # the refusal itself: one line, then only the count
                line = f"stopped: {outcome.entry_id} {outcome.task_name}: {outcome.message}"
                progress.console.print(Text(printable(line), style="yellow"), soft_wrap=True)
            stopped.append(outcome)
            return
        if outcome.status not in ("replayed", "sent"):  # one line per failure
            name = f" {outcome.task_name}" if outcome.task_name else ""
            line = f"{outcome.status}: {outcome.entry_id}{name}: {outcome.message}"
            progress.console.print(Text(printable(_clip(line, 400)), style="red"), soft_wrap=True)
            if args.traceback and outcome.traceback:
                progress.console.print(
                    Text(printable(outcome.traceback.rstrip(), multiline=True)), soft_wrap=True
                )

    with _exported(ctx), progress, _replay_runner(ctx) as runner:
        report = asyncio.run(
            dead_letters.replay(
                ids,
                runner,
                on_start=started,
                on_outcome=advanced,
                offload=False,  # the CLI owns its event loop: no thread hop per store call
                **(_filter_kwargs(args) if ids is None else {}),
            )
        )
    counts = {status: len(report.by_status(status)) for status in _STATUSES}
    summary = ", ".join(f"{n} {status.replace('_', ' ')}" for status, n in counts.items() if n)
    ctx.out.print(f"replay: {summary or 'no entries'}")
    if stopped:
        ctx.err.print(
            Text(
                f"stopped after {stopped[0].message}: {len(stopped)} entries not run (kept"
                " unchanged)",
                style="yellow",
            ),
            soft_wrap=True,
        )
    return 0 if report.ok else 1


@contextlib.contextmanager
def _replay_runner(ctx: _Context) -> Iterator[ReplayRunner]:
    """The runner: the one passed to `main`, else `run_dead_letter` on this process's executor
    with its failure log lines off (the CLI prints one line per failure itself; the traceback
    with ``--traceback``)."""
    if ctx.runner is not None:
        yield ctx.runner
        return
    executor = _executor(ctx.store())  # this invocation's settings (redaction included)
    quiet = executor.failures.quiet
    executor.failures.quiet = True
    try:
        yield functools.partial(run_dead_letter, executor=executor)
    finally:
        executor.failures.quiet = quiet


def _celery_routes(reference: str, store: DeadLetterStore) -> None:
    """Import the operator's Celery app and give every Celery route among the dead letters
    a dispatcher (unless the app's modules registered one), so replay sends them back."""
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise CLIError(f"--celery-app {reference!r}: expected MODULE:APP, e.g. shop.worker:app")
    try:
        module = importlib.import_module(module_name)
        app = getattr(module, attribute)
        from otel_bgtasks.celery import CeleryDispatcher  # optional extra: imported on use
    except ImportError as exc:
        raise CLIError(f"--celery-app {reference!r}: {exc}") from exc
    except AttributeError as exc:
        raise CLIError(f"--celery-app {reference!r}: {module_name} has no {attribute!r}") from exc
    routes = {e.route for e in store.list() if e.route and e.route.startswith("celery:")}
    for route in sorted(routes):
        if dispatcher_for(route) is None:
            CeleryDispatcher(app, queue=route[len("celery:") :])


_STATUSES: tuple[ReplayStatus, ...] = (
    "replayed",
    "sent",
    "failed",
    "not_run",
    "refused",
    "import_error",
    "error",
    "missing",
    "corrupt",
    "claimed",
)


def _cmd_purge(ctx: _Context) -> int:
    args = ctx.args
    store = ctx.store()
    filters = _filter_kwargs(args)
    unfiltered = all(v is None for v in filters.values())
    matching = store.count() if unfiltered else len(store.previews(**filters, chars=0))
    if matching == 0:
        ctx.out.print("nothing to purge")
        return 0
    noun = f"{matching} dead letter{'s' if matching != 1 else ''}"
    if not args.yes:
        if not sys.stdin.isatty():
            raise CLIError(f"refusing to purge {noun} without --yes (stdin is not a terminal)")
        answer = input(f"purge {noun}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            ctx.out.print("purge cancelled")
            return 0
    removed = store.purge(**filters)
    ctx.out.print(f"purged {removed} dead letter{'s' if removed != 1 else ''}")
    return 0


def _cmd_recover(ctx: _Context) -> int:
    store = ctx.store()
    with _exported(ctx):
        report = asyncio.run(
            recover_interrupted_tasks(
                mode="rerun" if ctx.args.rerun else "dead_letter",
                store=store,
                executor=_executor(store, same_store=True),
                stale_after=ctx.args.stale_after,
            )
        )
    if not report.total:
        ctx.out.print("recover: no interrupted durable tasks")
        return 0
    parts = {
        "re-run ok": report.rerun_succeeded,
        "re-run failed": report.rerun_failed,
        "dead-lettered": report.dead_lettered,
        "refused (kept as dead letters)": report.refused,
    }
    ctx.out.print("recover: " + ", ".join(f"{n} {what}" for what, n in parts.items() if n))
    return 0 if report.rerun_failed == 0 and report.refused == 0 else 1


def _cmd_demo(ctx: _Context) -> int:
    try:
        module = importlib.import_module("otel_bgtasks.demo.__main__")
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("otel_bgtasks.demo"):
            raise
        raise CLIError("the demo is not available in this installation") from None
    demo_main: Callable[..., Any] = module.main
    takes_args = bool(inspect.signature(demo_main).parameters)
    try:
        with contextlib.redirect_stdout(ctx.stdout):  # the demo's report is its result
            result = demo_main(list(ctx.args.demo_args)) if takes_args else demo_main()
    except SystemExit as exc:  # its argparse: --help, usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
