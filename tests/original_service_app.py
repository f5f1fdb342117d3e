"""Application code written for the seed's ``SupabaseSessionService``, used unchanged by the tests.

The flow of the seed's ``scripts/test_session_persistence.py`` ("Test 1: SupabaseSessionService")
and the save-and-recover round of a manager that keeps its sessions through the service. Only
the import differs from the original (``src.infrastructure.session_service``).
"""

import time

from pytest_exai_sessions.compat import get_session_service


async def check_session_service():
    """Test 1 of the seed's script: True when every step worked, False when Supabase is not configured."""
    service = get_session_service()
    if not service.enabled:
        print("Supabase not configured - skipping SupabaseSessionService test")
        return False

    session_id = f"test_session_{int(time.time() * 1000)}"
    session_data = {
        "state": "active",
        "user_id": "test_user",
        "user_type": "human",
        "ip_address": "127.0.0.1",
        "user_agent": "test-agent/1.0",
        "request_count": 0,
        "total_duration_ms": 0,
        "custom_field": "test_value",
    }

    print("1. save_session")
    assert await service.save_session(session_id, session_data), "save_session failed"

    print("2. load_session")
    loaded = await service.load_session(session_id)
    assert loaded is not None, "load_session returned nothing"
    assert loaded["session_id"] == session_id
    assert loaded["session_state"] == "active"
    assert loaded["user_id"] == "test_user"
    assert loaded["session_data"]["custom_field"] == "test_value"
    assert loaded["metadata"]["source"] == "session_manager"

    print("3. update_session_activity")
    assert await service.update_session_activity(session_id, request_duration_ms=150)
    assert await service.update_session_activity(session_id, request_duration_ms=250)
    updated = await service.load_session(session_id)
    assert updated["request_count"] == 2
    assert updated["total_duration_ms"] == 400
    assert updated["last_activity"] is not None

    print("4. list_sessions")
    active = await service.list_sessions(state="active", limit=10)
    assert session_id in [s["session_id"] for s in active]

    print("5. delete_session")
    assert await service.delete_session(session_id)
    assert await service.load_session(session_id) is None

    print("6. cleanup_expired_sessions")
    cleaned = await service.cleanup_expired_sessions(older_than_days=7)
    assert isinstance(cleaned, int) and cleaned >= 0

    print("SupabaseSessionService: PASSED")
    return True


async def persist_sessions(sessions):
    """What the enhanced manager did on every change: ``{session_id: session_data}`` saved through the service."""
    service = get_session_service()
    for session_id, session_data in sessions.items():
        await service.save_session(session_id, session_data)


async def recover_sessions():
    """What the enhanced manager did at startup: every active session, in the manager's view, by id."""
    service = get_session_service()
    records = await service.list_sessions(state="active", limit=1000)
    return {record["session_id"]: service.deserialize_session(record) for record in records}
