"""Dead-letter records, serializer, function references, identities and the operator API."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from otel_bgtasks.calls import (
    DecodedCall,
    JSONSerializer,
    Serializer,
    encode_call,
    func_ref,
    get_serializer,
    resolve,
)
from otel_bgtasks.errors import SerializationError, TaskImportError
from otel_bgtasks.identity import owner_is_alive, owner_is_dead, process_identity
from otel_bgtasks.records import DeadLetter, DeadLetterReason, JournalEntry
from otel_bgtasks.registry import declare_task_modules, register_task
from otel_bgtasks.replay import DeadLetters, ReplayOutcome, ReplayResult
from otel_bgtasks.stores import SQLiteDeadLetterStore
from tests.support.owners import dead_owner, dead_pid, identity_of
from tests.unit.test_deadletter_contract import SPAN_ID, T0, TRACE_ID, make_entry, make_journal

# -- module-level tasks (importable by reference) ---------------------------------------------

SINK: list[Any] = []


def many(*items: Any) -> None: ...


def send_mail(address: str, *, subject: str = "hi") -> None:
    SINK.append((address, subject))


async def async_task(value: int) -> None:
    await asyncio.sleep(0)
    SINK.append(value)


def always_fails(value: int) -> None:
    raise ConnectionError(f"downstream still down for {value}")


class Jobs:
    @staticmethod
    def nightly(day: str) -> None:
        SINK.append(day)


class User:
    pass


@pytest.fixture(autouse=True)
def _app_tasks() -> None:
    """This module is a declared task module (its own functions are replayable); a static
    method, which that rule does not cover, is registered as @background_task does."""
    declare_task_modules([__name__])
    register_task(Jobs.nightly)


@pytest.fixture(autouse=True)
def _clear_sink() -> Iterator[None]:
    SINK.clear()
    yield
    SINK.clear()


# -- records ----------------------------------------------------------------------------------


def test_dead_letter_json_round_trip() -> None:
    entry = make_entry(reason=DeadLetterReason.CIRCUIT_OPEN)
    data = json.loads(entry.to_json())
    assert data == {
        "id": entry.id,
        "task_name": "send_mail",
        "func_ref": "tests.unit.test_deadletter:send_mail",
        "payload": entry.payload,
        "serializer": "json",
        "error_type": "ConnectionError",
        "error_message": "smtp down",
        "traceback": entry.traceback,
        "category": "connection",
        "attempts": 3,
        "first_failure": T0,
        "last_failure": T0 + 10,
        "reason": "circuit_open",
        "trace_id": TRACE_ID,
        "span_id": SPAN_ID,
        "signature": "",
    }
    assert DeadLetter.from_json(entry.to_json()) == entry
    assert DeadLetter.from_dict({**data, "last_failure": 5}).last_failure == 5.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"reason": "nope"}, "'nope' is not a valid DeadLetterReason"),
        ({"attempts": "3"}, "field 'attempts' must be int, got str"),
        ({"attempts": True}, "field 'attempts' must be int, got bool"),
        ({"trace_id": "xyz"}, "trace_id must be 32 lowercase hex digits"),
        ({"span_id": "B7AD6B7169203331"}, "span_id must be 16 lowercase hex digits"),
        ({"id": ""}, "id must not be empty"),
    ],
)
def test_dead_letter_from_dict_rejects_bad_fields(change: dict[str, Any], message: str) -> None:
    data = {**make_entry().to_dict(), **change}
    with pytest.raises(ValueError, match=message):
        DeadLetter.from_dict(data)


def test_dead_letter_from_dict_missing_field() -> None:
    data = make_entry().to_dict()
    del data["attempts"]
    with pytest.raises(ValueError, match="missing field 'attempts'"):
        DeadLetter.from_dict(data)
    del data["serializer"], data["trace_id"], data["span_id"]  # defaulted fields
    data["attempts"] = 1
    assert DeadLetter.from_dict(data).serializer == "json"


def test_from_exception_and_with_failure() -> None:
    try:
        raise TimeoutError("took too long")
    except TimeoutError as exc:
        entry = DeadLetter.from_exception(
            exc,
            task_name="t",
            func_ref="m:f",
            payload="{}",
            reason=DeadLetterReason.TIMEOUT,
            attempts=2,
            first_failure=T0,
            last_failure=T0 + 3,
            category="timeout",
            trace_id=TRACE_ID,
            span_id=SPAN_ID,
        )
    assert len(entry.id) == 32
    assert int(entry.id, 16) >= 0
    assert (entry.error_type, entry.error_message, entry.category) == (
        "TimeoutError",
        "took too long",
        "timeout",
    )
    assert entry.traceback.startswith("Traceback (most recent call last):")
    assert entry.traceback.rstrip().endswith("TimeoutError: took too long")
    assert (entry.first_failure, entry.last_failure, entry.attempts) == (T0, T0 + 3, 2)

    again = entry.with_failure(
        ValueError("bad input"), at=T0 + 9, reason=DeadLetterReason.PERMANENT
    )
    assert (again.id, again.attempts, again.last_failure, again.first_failure) == (
        entry.id,
        3,
        T0 + 9,
        T0,
    )
    assert (again.error_type, again.error_message, again.reason) == (
        "ValueError",
        "bad input",
        DeadLetterReason.PERMANENT,
    )
    bare = entry.with_failure(at=T0 + 10)
    assert (bare.attempts, bare.error_message, bare.reason) == (3, "took too long", entry.reason)
    assert entry.replace(attempts=7).attempts == 7


def test_error_type_of_non_builtin_is_module_qualified() -> None:
    entry = DeadLetter.from_exception(
        SerializationError("x"),
        task_name="t",
        func_ref="",
        payload="",
        reason=DeadLetterReason.PERMANENT,
        attempts=1,
    )
    assert entry.error_type == "otel_bgtasks.errors.SerializationError"
    assert entry.first_failure == entry.last_failure


def test_journal_entry_round_trip() -> None:
    entry = make_journal()
    assert JournalEntry.from_json(entry.to_json()) == entry
    with pytest.raises(ValueError, match="missing field 'owner'"):
        JournalEntry.from_dict({k: v for k, v in entry.to_dict().items() if k != "owner"})
    with pytest.raises(ValueError, match="expected a JSON object, got list"):
        JournalEntry.from_json("[]")


# -- serializer -------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=12,
)


@given(
    args=st.lists(json_values, max_size=4),
    kwargs=st.dictionaries(st.text(min_size=1, max_size=8), json_values, max_size=4),
)
def test_json_serializer_round_trips_json_values(args: list[Any], kwargs: dict[str, Any]) -> None:
    serializer = JSONSerializer()
    assert serializer.loads(serializer.dumps(tuple(args), kwargs)) == (tuple(args), kwargs)


def test_json_serializer_tuples_come_back_as_lists() -> None:
    serializer = JSONSerializer()
    assert serializer.loads(serializer.dumps(((1, 2),), {"k": (3,)})) == (([1, 2],), {"k": [3]})


def test_json_serializer_is_a_serializer() -> None:
    assert isinstance(JSONSerializer(), Serializer)
    assert get_serializer("json").name == "json"
    with pytest.raises(
        LookupError, match="no serializer named 'pickle' is registered; known: json"
    ):
        get_serializer("pickle")


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((User(),), {}, r"^argument at position 0 is not JSON-serializable \(User\)$"),
        (("ok", {"a": [1, {2}]}), {}, r"position 1 \(at \['a'\]\[1\]\) .* \(set\)$"),
        ((), {"when": b"x"}, r"^argument 'when' is not JSON-serializable \(bytes\)$"),
        (({1: "int key"},), {}, r"\(at \[1\] key\) is not JSON-serializable \(int\)"),
        ((float("nan"),), {}, r"position 0 is not JSON-serializable \(float\)"),
    ],
)
def test_json_serializer_names_the_bad_argument(
    args: tuple[Any, ...], kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(SerializationError, match=message):
        JSONSerializer().dumps(args, kwargs)


def test_json_serializer_rejects_foreign_payloads() -> None:
    with pytest.raises(ValueError, match="must be an object with 'args'"):
        JSONSerializer().loads('{"args": 1}')


def dump_call(serializer: Serializer, func: Any, args: Any, kwargs: Any, *, task_name: str) -> str:
    return encode_call(serializer, func, args, kwargs, task_name=task_name).payload


def test_encode_call_names_parameter_position_and_task() -> None:
    with pytest.raises(SerializationError) as raised:
        dump_call(JSONSerializer(), send_mail, (User(),), {}, task_name="send-mail")
    assert str(raised.value) == (
        "argument 'address' (position 0) of task send-mail is not serializable by 'json' (User);"
        " pass JSON-serializable values or a serializer=..."
    )
    assert isinstance(raised.value, TypeError)
    with pytest.raises(
        SerializationError, match=r"^argument 'subject' of task t .*\(set at \[0\]\)"
    ):
        dump_call(JSONSerializer(), send_mail, ("a",), {"subject": [{1}]}, task_name="t")
    assert dump_call(JSONSerializer(), send_mail, ("a",), {}, task_name="t") == (
        '{"args":["a"],"kwargs":{}}'
    )


def test_encode_call_with_var_positional() -> None:
    with pytest.raises(SerializationError, match=r"argument '\*items' \(position 1\)"):
        dump_call(JSONSerializer(), many, (1, User()), {}, task_name="t")


# -- function references ----------------------------------------------------------------------


def test_func_ref_and_resolve_round_trip() -> None:
    assert func_ref(send_mail) == "tests.unit.test_deadletter:send_mail"
    assert func_ref(async_task) == "tests.unit.test_deadletter:async_task"
    assert func_ref(Jobs.nightly) == "tests.unit.test_deadletter:Jobs.nightly"
    assert resolve("tests.unit.test_deadletter:Jobs.nightly") is Jobs.nightly
    assert resolve(func_ref(send_mail)) is send_mail
    with pytest.raises(TaskImportError, match=r"'os\.path:join' is not a registered task"):
        resolve("os.path:join")  # importable, but not one of the app's tasks


def test_func_ref_refuses_what_another_process_cannot_import() -> None:
    def local() -> None: ...

    refused: list[Any] = [
        functools.partial(send_mail, "a"),
        lambda: None,
        local,
        Jobs().nightly.__get__,  # a method-wrapper: no module
        User(),
        User,
        "not callable",
    ]
    for candidate in refused:
        with pytest.raises(TypeError, match="must be module-level functions"):
            func_ref(candidate)


def test_func_ref_refuses_bound_methods_and_main() -> None:
    class Holder:
        def method(self) -> None: ...

    with pytest.raises(TypeError, match="cannot reference a bound method"):
        func_ref(Holder().method)

    def fake_main() -> None: ...

    fake_main.__module__ = "__main__"
    fake_main.__qualname__ = "fake_main"
    with pytest.raises(TypeError, match="defined in __main__"):
        func_ref(fake_main)


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        (
            "no_such_module_xyz:f",
            r"^refused: task 'no_such_module_xyz:f' is not a registered task of this app"
            r" \(declared task modules: .*tests.unit.test_deadletter.*\); decorate it with"
            r" @background_task in a module given by --tasks or OTEL_BGTASKS_TASK_MODULES;"
            r" the entry is kept$",
        ),
        ("tests.unit.test_deadletter:gone", r"'tests.unit.test_deadletter:gone' is not a reg"),
        ("tests.unit.test_deadletter:SINK", r"'tests.unit.test_deadletter:SINK' is not a reg"),
        ("tests.unit.test_deadletter:User", r"'tests.unit.test_deadletter:User' is not a reg"),
        ("tests.unit.test_deadletter:os", r"'tests.unit.test_deadletter:os' is not a reg"),
        ("missing_colon", r"'missing_colon' is not a registered task"),
        ("", r"the entry has no function reference"),
    ],
)
def test_resolve_errors(ref: str, message: str) -> None:
    with pytest.raises(TaskImportError, match=message) as raised:
        resolve(ref)
    assert isinstance(raised.value, LookupError)


# -- process identity -------------------------------------------------------------------------


def test_process_identity_is_stable_and_parsable() -> None:
    me = process_identity()
    assert me == process_identity()
    host, pid, token = me.split(":")
    assert (host, int(pid)) == (socket.gethostname(), os.getpid())
    boot, pidns, start, rand = token.split(".")
    with open("/proc/sys/kernel/random/boot_id") as f:
        assert boot == f.read().strip().replace("-", "")[:16]
    assert pidns == os.readlink("/proc/self/ns/pid").strip("pid:[]")
    assert start.isdigit()
    assert len(rand) == 12
    assert owner_is_dead(me) is False


def test_a_live_process_is_never_taken_for_dead() -> None:
    parent = os.getppid()
    assert owner_is_dead(identity_of(parent)) is False
    assert owner_is_alive(identity_of(parent)) is True
    assert owner_is_alive(identity_of(parent, start="1")) is False
    assert owner_is_alive(identity_of(1, pidns="4026599999")) is False  # cannot tell
    assert owner_is_alive(process_identity()) is True
    # same hostname, pid 1, another PID namespace (another container): only heartbeats tell
    assert owner_is_dead(identity_of(1, pidns="4026599999")) is False
    assert owner_is_dead(identity_of(os.getpid(), pidns="4026599999")) is False


def test_a_reused_pid_is_not_its_former_owner() -> None:
    # the parent's pid, but started at another time: the owner was an earlier process
    assert owner_is_dead(identity_of(os.getppid(), start="1")) is True
    assert owner_is_dead(identity_of(os.getpid(), start="1")) is True  # an earlier self


def test_owner_is_dead() -> None:
    assert owner_is_dead(dead_owner()) is True
    assert owner_is_dead(identity_of(os.getppid())) is False
    elsewhere = dead_owner().replace(socket.gethostname(), "another-host", 1)
    assert owner_is_dead(elsewhere) is False  # only heartbeats can tell
    assert owner_is_dead("garbage") is False


def test_an_identity_without_proc_parts_is_judged_by_pid_only_between_such_systems() -> None:
    host = socket.gethostname()
    # we have /proc, the owner did not: not the same system, only heartbeats can tell
    assert owner_is_dead(f"{host}:{dead_pid()}:0123456789ab") is False
    assert owner_is_dead(f"{host}:{os.getpid()}:0123456789ab") is False
    assert owner_is_alive(f"{host}:{os.getpid()}:0123456789ab") is False


# -- operator API: DeadLetters and replay ------------------------------------------------------


async def run_for_real(entry: DeadLetter, call: DecodedCall) -> ReplayResult:
    """A replay runner without telemetry: call what replay decoded."""
    func, args, kwargs = call
    try:
        result = func(*args, **kwargs)
        if asyncio.iscoroutine(result):
            await result
    except Exception as exc:
        return ReplayResult(ok=False, entry=entry.with_failure(exc))
    return ReplayResult(ok=True)


def _payload(*args: Any, **kwargs: Any) -> str:
    return JSONSerializer().dumps(args, kwargs)


async def test_replay_all_deletes_successes_updates_failures_keeps_unimportable(
    store: SQLiteDeadLetterStore,
) -> None:
    ok_sync = make_entry(
        func_ref=func_ref(send_mail), payload=_payload("a@x", subject="s"), last_failure=T0 + 1
    )
    fails = make_entry(
        task_name="always_fails",
        func_ref=func_ref(always_fails),
        payload=_payload(7),
        attempts=3,
        last_failure=T0 + 2,
    )
    gone = make_entry(
        task_name="old", func_ref="tests.unit.test_deadletter:removed", last_failure=T0 + 3
    )
    ok_async = make_entry(func_ref=func_ref(async_task), payload=_payload(42), last_failure=T0 + 4)
    for e in (ok_sync, fails, gone, ok_async):
        store.put(e)

    seen: list[ReplayOutcome] = []
    totals: list[int] = []
    with capture_logs() as logs:
        report = await DeadLetters(store).replay(
            None, run_for_real, on_outcome=seen.append, on_start=totals.append
        )

    assert totals == [4]
    assert [(o.entry_id, o.status) for o in report.outcomes] == [
        (ok_sync.id, "replayed"),
        (fails.id, "failed"),
        (gone.id, "refused"),  # no longer one of the app's tasks
        (ok_async.id, "replayed"),
    ]
    assert seen == report.outcomes
    assert report.replayed == 2
    assert report.ok is False
    assert report.outcomes[1].message == "ConnectionError: downstream still down for 7"
    assert "'tests.unit.test_deadletter:removed' is not a registered task" in (
        report.outcomes[2].message
    )
    assert SINK == [("a@x", "s"), 42]

    kept = {e.id: e for e in store.list()}
    assert set(kept) == {fails.id, gone.id}
    assert kept[gone.id] == gone  # untouched
    assert kept[fails.id].attempts == 4
    assert kept[fails.id].error_message == "downstream still down for 7"
    assert kept[fails.id].last_failure > fails.last_failure
    assert [(log["event"], log["entry_id"]) for log in logs] == [
        ("dead letter replay refused", gone.id)
    ]


async def test_replay_keeps_entries_whose_serializer_is_unknown_here(
    store: SQLiteDeadLetterStore,
) -> None:
    entry = make_entry(func_ref=func_ref(send_mail), serializer="msgpack", payload="((), {})")
    store.put(entry)
    runner_calls: list[str] = []

    async def runner(e: DeadLetter, call: DecodedCall) -> ReplayResult:
        runner_calls.append(e.id)
        return ReplayResult(ok=True)

    with capture_logs():
        report = await DeadLetters(store).replay(None, runner)
    assert [(o.status, o.message.split(";")[0]) for o in report.outcomes] == [
        ("import_error", "no serializer named 'msgpack' is registered")
    ]
    assert runner_calls == []
    assert store.list() == [entry]


async def test_replay_by_ids_reports_missing_and_dedupes(store: SQLiteDeadLetterStore) -> None:
    entry = make_entry(func_ref=func_ref(send_mail), payload=_payload("b@x"))
    other = make_entry(func_ref=func_ref(send_mail), payload=_payload("c@x"))
    store.put(entry)
    store.put(other)
    missing = "f" * 32
    report = await DeadLetters(store).replay([entry.id, missing, entry.id], run_for_real)
    assert [(o.entry_id, o.status) for o in report.outcomes] == [
        (entry.id, "replayed"),
        (missing, "missing"),
    ]
    assert store.list() == [other]
    assert SINK == [("b@x", "hi")]


async def test_replay_with_filters(store: SQLiteDeadLetterStore) -> None:
    a = make_entry(task_name="a", func_ref=func_ref(send_mail), payload=_payload("a@x"))
    b = make_entry(task_name="b", func_ref=func_ref(send_mail), payload=_payload("b@x"))
    store.put(a)
    store.put(b)
    report = await DeadLetters(store).replay(None, run_for_real, task="b")
    assert [o.entry_id for o in report.outcomes] == [b.id]
    assert store.list() == [a]


async def test_replay_failure_without_entry_bumps_attempts(store: SQLiteDeadLetterStore) -> None:
    entry = make_entry(func_ref=func_ref(send_mail), attempts=5)
    store.put(entry)

    async def refuses(e: DeadLetter, call: DecodedCall) -> ReplayResult:
        return ReplayResult(ok=False)

    report = await DeadLetters(store).replay([entry.id], refuses)
    assert report.outcomes[0].status == "failed"
    stored = store.get(entry.id)
    assert stored is not None
    assert stored.attempts == 6
    assert stored.error_message == entry.error_message
    assert stored.last_failure > entry.last_failure


async def test_a_broken_runner_affects_only_its_entry(store: SQLiteDeadLetterStore) -> None:
    first = make_entry(func_ref=func_ref(send_mail), payload=_payload("1"), last_failure=T0 + 1)
    second = make_entry(func_ref=func_ref(send_mail), payload=_payload("2"), last_failure=T0 + 2)
    store.put(first)
    store.put(second)

    async def flaky_runner(entry: DeadLetter, call: DecodedCall) -> ReplayResult:
        if entry.id == first.id:
            raise RuntimeError("runner bug")
        return await run_for_real(entry, call)

    with capture_logs():
        report = await DeadLetters(store).replay(None, flaky_runner)
    assert [(o.status, o.message) for o in report.outcomes] == [
        ("error", "RuntimeError: runner bug"),
        ("replayed", ""),
    ]
    assert store.list() == [first]


def test_dead_letters_show_delete_purge(store: SQLiteDeadLetterStore) -> None:
    entry = make_entry()
    store.put(entry)
    dl = DeadLetters(store)
    assert dl.show(entry.id) == entry
    assert dl.list(task="send_mail") == [entry]
    with pytest.raises(KeyError):
        dl.show("0" * 32)
    assert dl.delete(entry.id) is True
    store.put(make_entry())
    assert dl.purge() == 1
