"""Sessions as the checker sees them (JSON states) and as a store returns them, for hand-made histories."""

from pytest_exai_sessions import Session

# A fixed instant: the checker compares states, never the time they were made.
CREATED = "2026-01-01T00:00:00Z"


def state(session_id, **fields):
    base = Session(session_id=session_id, created_at=CREATED, last_activity=CREATED).model_dump(mode="json")
    return {**base, **fields}


def row(session_id, **fields):
    return Session.model_validate(state(session_id, **fields))
