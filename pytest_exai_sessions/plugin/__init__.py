"""The pytest plugin (entry point ``pytest_exai_sessions.plugin``): its hooks and fixtures.

Thin wiring: ``hooks`` (options, marker, header, cleanup), ``servers`` (which server a run
uses, decided once), ``fixtures`` (what tests ask for), ``power_loss`` (the harness on a
disk that can lose power), ``failover`` (the harness on a primary with
standbys). Nothing outside this package imports it.
"""

from .failover import exai_failover_clusters, failover_harness
from .fixtures import (
    _exai_template_before_any_test,
    crash_harness,
    event_store,
    exai_as_role,
    exai_as_service_role,
    exai_as_user,
    exai_config,
    exai_databases,
    exai_db_clock,
    exai_direct_dsn,
    exai_dsn,
    exai_manager_options,
    exai_pg_server,
    exai_pgbouncer,
    exai_pooler,
    exai_rollback_conn,
    exai_shared_dsn,
    exai_supabase,
    exai_templates,
    session_manager,
    session_manager_factory,
    session_replicas,
    session_store,
)
from .hooks import (
    pytest_addoption,
    pytest_assertrepr_compare,
    pytest_configure,
    pytest_report_header,
    pytest_sessionfinish,
    pytest_terminal_summary,
    pytest_testnodedown,
    pytest_unconfigure,
)
from .power_loss import exai_power_loss_servers, power_loss_harness

__all__ = [
    "_exai_template_before_any_test",
    "crash_harness",
    "event_store",
    "exai_as_role",
    "exai_as_service_role",
    "exai_as_user",
    "exai_config",
    "exai_databases",
    "exai_db_clock",
    "exai_direct_dsn",
    "exai_dsn",
    "exai_failover_clusters",
    "exai_manager_options",
    "exai_pg_server",
    "exai_pgbouncer",
    "exai_pooler",
    "exai_power_loss_servers",
    "exai_rollback_conn",
    "exai_shared_dsn",
    "exai_supabase",
    "exai_templates",
    "failover_harness",
    "power_loss_harness",
    "pytest_addoption",
    "pytest_assertrepr_compare",
    "pytest_configure",
    "pytest_report_header",
    "pytest_sessionfinish",
    "pytest_terminal_summary",
    "pytest_testnodedown",
    "pytest_unconfigure",
    "session_manager",
    "session_manager_factory",
    "session_replicas",
    "session_store",
]
