"""Bad input raises a clear error and writes nothing, in the database or in memory.

Every case runs against PostgreSQL (rows compared before and after, read by a separate
connection) and in memory only (sessions compared before and after).
"""

import math
from datetime import UTC, date, datetime
from decimal import Decimal

import psycopg
import pytest
import pytest_asyncio
from psycopg.rows import dict_row

from pytest_exai_sessions import SessionManager
from pytest_exai_sessions.models import MAX_DURATION_MS, MAX_JSON_BYTES, MAX_JSON_DEPTH

EXISTING = "existing"


def nested(levels):
    value = 0
    for _ in range(levels):
        value = {"a": value}
    return value


async def handle_request(manager, session_id):
    async with manager.request(session_id):
        pass


def case(name, operation, message):
    """One bad call: ``operation(manager)`` must raise an error whose text matches ``message``."""
    return pytest.param(operation, message, id=name)


BAD_INPUTS = [
    # session ids
    case("blank id", lambda m: m.ensure("   "), "empty or blank"),
    case("empty id to get", lambda m: m.get(""), "empty or blank"),
    case("empty id to update", lambda m: m.update("", data={}), "empty or blank"),
    case("blank id to update_activity", lambda m: m.update_activity("  "), "empty or blank"),
    case("unicode blank id", lambda m: m.ensure("\u3000\u2003\u00a0"), "empty or blank"),
    case("empty id to remove", lambda m: m.remove(""), "empty or blank"),
    case("256-char id", lambda m: m.ensure("x" * 256), "256 characters long"),
    case("256-char id to update", lambda m: m.update("x" * 256, data={}), "256 characters long"),
    case("256-char id to get", lambda m: m.get("x" * 256), "256 characters long"),
    case("256 two-byte chars in id", lambda m: m.ensure("é" * 256), "256 characters long"),
    case("SQL in an over-long id", lambda m: m.ensure("x'); DROP TABLE sessions;--" * 10), "270 characters long"),
    case("NUL in id", lambda m: m.ensure("a\x00b"), "control character '\\\\x00'"),
    case("newline in id", lambda m: m.ensure("line\nbreak"), "control character '\\\\n'"),
    case("bell in id", lambda m: m.ensure("bell\x07"), "control character '\\\\x07'"),
    case("NUL in id to get", lambda m: m.get("a\x00b"), "control character"),
    case("newline in id to update_activity", lambda m: m.update_activity("a\nb", 1), "control character"),
    case("bell in id to remove", lambda m: m.remove("bell\x07"), "control character"),
    case("NUL in id to request", lambda m: handle_request(m, "a\x00"), "control character"),
    case("int id", lambda m: m.ensure(42), "must be a str"),
    case("bytes id", lambda m: m.ensure(b"abc"), "must be a str"),
    # JSON data and metadata
    case("NaN", lambda m: m.ensure(data={"x": math.nan}), "nan at \\$.x is not valid JSON"),
    case("Infinity", lambda m: m.ensure(data={"x": math.inf}), "inf at \\$.x is not valid JSON"),
    case("-Infinity in update", lambda m: m.update(EXISTING, metadata={"x": -math.inf}), "not valid JSON"),
    case("set", lambda m: m.ensure(data={"tags": {"a", "b"}}), "set at \\$.tags is not JSON"),
    case("bytes", lambda m: m.update(EXISTING, data={"blob": b"raw"}), "bytes at \\$.blob is not JSON"),
    case("tuple", lambda m: m.ensure(data={"pair": (1, 2)}), "tuple at \\$.pair is not JSON"),
    case("datetime", lambda m: m.ensure(data={"when": datetime.now(UTC)}), "datetime at \\$.when"),
    case("date in update", lambda m: m.update(EXISTING, data={"day": date(2030, 1, 1)}), "date at \\$.day"),
    case("Decimal", lambda m: m.ensure(metadata={"price": Decimal("1.10")}), "Decimal at \\$.price"),
    case("bytes in a list", lambda m: m.ensure(data={"parts": ["a", b"b"]}), "bytes at \\$.parts\\[1\\]"),
    case("object", lambda m: m.ensure(metadata={"x": object()}), "object at \\$.x is not JSON"),
    case("int key", lambda m: m.ensure(data={1: "one"}), "valid string"),
    case("bytes key", lambda m: m.ensure(metadata={b"k": 1}), "valid string"),
    case("nested int key", lambda m: m.update(EXISTING, data={"x": {2: "two"}}), "key 2 at \\$.x is not a str"),
    case("NUL in a JSON string", lambda m: m.ensure(data={"x": "a\x00b"}), "contains NUL"),
    case("NUL in a JSON key", lambda m: m.ensure(data={"a\x00": 1}), "contains NUL"),
    case("too deep", lambda m: m.ensure(data=nested(MAX_JSON_DEPTH + 1)), f"deeper than {MAX_JSON_DEPTH}"),
    case(
        "too large",
        lambda m: m.update(EXISTING, data={"x": "a" * MAX_JSON_BYTES}),
        f"at most {MAX_JSON_BYTES} are allowed",
    ),
    case(
        "multi-megabyte data",
        lambda m: m.ensure(data={"blob": "a" * (5 * MAX_JSON_BYTES)}),
        f"JSON payload is {5 * MAX_JSON_BYTES + 11} bytes; at most {MAX_JSON_BYTES}",
    ),
    case(
        "multi-megabyte metadata in update",
        lambda m: m.update(EXISTING, metadata={f"key-{n}": n for n in range(300_000)}),
        f"at most {MAX_JSON_BYTES} are allowed",
    ),
    # Measured on the JSON text the store sends, where "é" is written "\\u00e9": 6 bytes.
    case("over the limit as sent", lambda m: m.ensure(data={"x": "é" * 200_000}), "JSON payload is 1200008 bytes"),
    case("float jsonb would change", lambda m: m.ensure(data={"x": 1e25}), "would come back"),
    case("list instead of object", lambda m: m.ensure(data=[1, 2]), "valid dictionary"),
    case("bad data for an existing session", lambda m: m.ensure(EXISTING, data={"x": {1}}), "set at"),
    # durations
    case("negative duration", lambda m: m.update_activity(EXISTING, -1), "must not be negative"),
    case("absurd duration", lambda m: m.update_activity(EXISTING, MAX_DURATION_MS + 1), "implausible"),
    case("huge duration", lambda m: m.update_activity(EXISTING, 10**15), "implausible"),
    case("float duration", lambda m: m.update_activity(EXISTING, 1.5), "must be an int"),
    case("bool duration", lambda m: m.update_activity(EXISTING, True), "must be an int"),
    case("str duration", lambda m: m.update_activity(EXISTING, "10"), "must be an int"),
    case("NaN duration", lambda m: m.update_activity(EXISTING, math.nan), "must be an int"),
    case("year-long duration", lambda m: m.update_activity(EXISTING, 365 * 24 * 3600 * 1000), "implausible"),
    # addresses
    case("IPv4 out of range", lambda m: m.ensure(ip_address="999.1.1.1"), "not an IPv4 or IPv6"),
    case("host name as IP", lambda m: m.ensure(ip_address="localhost"), "not an IPv4 or IPv6"),
    case("network as IP", lambda m: m.update(EXISTING, ip_address="192.0.2.0/24"), "not an IPv4 or IPv6"),
    case("IPv6 zone", lambda m: m.ensure(ip_address="fe80::1%eth0"), "zone"),
    case("empty IP", lambda m: m.ensure(ip_address=""), "not an IPv4 or IPv6"),
    case("IPv4 with leading zeros", lambda m: m.ensure(ip_address="010.0.0.1"), "not an IPv4 or IPv6"),
    case("IPv6 with too many groups", lambda m: m.update(EXISTING, ip_address="1:2:3:4:5:6:7:8:9"), "not an IPv4"),
    # user types and other fields
    case("unknown user type", lambda m: m.ensure(user_type="robot"), "user_type"),
    case("unknown user type in update", lambda m: m.update(EXISTING, user_type="admin"), "user_type"),
    case("user type in the wrong case", lambda m: m.ensure(user_type="Human"), "user_type"),
    case("unknown state in update", lambda m: m.update(EXISTING, state="deleted"), "state"),
    case("NUL in user_id", lambda m: m.ensure(user_id="a\x00"), "NUL"),
    case("NUL in user_agent", lambda m: m.update(EXISTING, user_agent="x\x00"), "NUL"),
    case("int user_id", lambda m: m.ensure(user_id=42), "valid string"),
    case("naive expires_at", lambda m: m.ensure(expires_at=datetime(2030, 1, 1)), "timezone-aware"),
    case("str expires_at", lambda m: m.update(EXISTING, expires_at="tomorrow"), "expires_at"),
    # attributes ensure() does not know
    case("unknown attribute", lambda m: m.ensure(colour="blue"), "unknown attributes \\['colour'\\]"),
    case("counter as attribute", lambda m: m.ensure(request_count=5), "unknown attributes"),
    case("state as attribute", lambda m: m.ensure(state="expired"), "unknown attributes"),
    case("column name as attribute", lambda m: m.ensure(session_data={}), "unknown attributes"),
]


@pytest_asyncio.fixture
async def manager(persistence):
    """A started manager holding one session, EXISTING."""
    if persistence is not None:
        manager = await persistence()
    else:
        manager = await SessionManager(None).start()
    await manager.ensure(EXISTING, data={"kept": True})
    yield manager
    if persistence is None:
        await manager.aclose()


async def all_rows(manager):
    """Every row of public.sessions, every column, read by a connection of its own (in memory: the MemoryStore's)."""
    if not manager.persistence_enabled:
        return [session async for session in manager.store.iter_all()]
    async with await psycopg.AsyncConnection.connect(manager.store.conninfo, row_factory=dict_row) as conn:
        cur = await conn.execute("SELECT * FROM public.sessions ORDER BY id")
        return await cur.fetchall()


@pytest.mark.asyncio
@pytest.mark.parametrize(("operation", "message"), BAD_INPUTS)
async def test_bad_input_raises_a_clear_error_and_writes_nothing(manager, operation, message):
    rows_before = await all_rows(manager)
    sessions_before = manager.live_sessions()

    with pytest.raises((ValueError, TypeError), match=message):
        await operation(manager)

    assert await all_rows(manager) == rows_before
    assert manager.live_sessions() == sessions_before
    assert (await manager.get(EXISTING)).data == {"kept": True}


INJECTION = "x'); DROP TABLE sessions;--"


@pytest.mark.asyncio
async def test_sql_in_an_id_or_a_value_is_stored_as_plain_text(session_manager, session_manager_factory, exai_dsn):
    await session_manager.ensure("bystander")

    created = await session_manager.ensure(INJECTION, user_agent=INJECTION, data={INJECTION: INJECTION})
    await session_manager.update_activity(INJECTION, 1)
    await session_manager.update(INJECTION, metadata={"q": "'; DELETE FROM sessions; --"})

    assert created.session_id == INJECTION
    async with await psycopg.AsyncConnection.connect(exai_dsn) as conn:
        cur = await conn.execute("SELECT session_id, user_agent, session_data FROM public.sessions ORDER BY id")
        assert await cur.fetchall() == [
            ("bystander", None, {}),
            (INJECTION, INJECTION, {INJECTION: INJECTION}),
        ]
    reloaded = await (await session_manager_factory()).get(INJECTION)
    assert reloaded == await session_manager.get(INJECTION)
    assert reloaded.request_count == 1

    await session_manager.remove(INJECTION)

    assert await session_manager.list_ids() == ["bystander"]
    assert (await session_manager_factory()).live_sessions().keys() == {"bystander"}
