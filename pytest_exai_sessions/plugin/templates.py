"""The run's templates: one per schema, built on first use (or found in the cached cluster) and dropped at the end.

The plugin's own template holds what the options say (``exai_migrations``,
``exai_unified_schema``); ``factories.database(migrations=..., unified_schema=...)``
declares more. Declared schemas are noted when the factory runs, at import, so that
``--exai-reuse`` can build every one of them into the cached cluster, each named after its
own key.
"""

from __future__ import annotations

import time
from typing import NoReturn

import psycopg
import pytest

from ..errors import MigrationError
from ..server import PostgresServer
from ..server.cache import cached_template_name
from ..testing.databases import TestDatabases
from ..testing.template_schema import ResolvedSchema, TemplateSchema
from .config import ExaiConfig
from .timings import SetupTimings

# Schemas the factories declared in this process; emptied when a run ends (pytester's inline runs).
DECLARED: list[TemplateSchema] = []


def main_schema(exai: ExaiConfig) -> TemplateSchema:
    return TemplateSchema(unified=exai.unified_schema, app=exai.migrations)


def every_schema(exai: ExaiConfig) -> list[ResolvedSchema]:
    """The plugin's schema and every declared one, resolved (files read, functions imported)."""
    resolved: dict[str, ResolvedSchema] = {}
    for schema in [main_schema(exai), *DECLARED]:
        one = schema.resolve(exai.rootdir)
        resolved.setdefault(one.key, one)
    return list(resolved.values())


class Templates:
    """The ``TestDatabases`` of each schema on one server, made when first asked for."""

    def __init__(
        self, server: PostgresServer, exai: ExaiConfig, *, cached: bool, timings: SetupTimings | None = None
    ) -> None:
        """``cached``: the server runs from the cached cluster, where templates are named after their keys.

        ``timings``: where the first template's build is recorded (as "schema").
        """
        self.server = server
        self.exai = exai
        self.cached = cached
        self.timings = timings or SetupTimings()
        self._by_key: dict[str, TestDatabases] = {}
        self._resolved: dict[TemplateSchema, ResolvedSchema] = {}

    def resolve(self, schema: TemplateSchema) -> ResolvedSchema:
        if schema not in self._resolved:
            self._resolved[schema] = schema.resolve(self.exai.rootdir)
        return self._resolved[schema]

    def databases(self, schema: TemplateSchema) -> TestDatabases:
        """The databases of this schema; its template is built (or found) now if it is the first time.

        Raises ``MigrationError`` when a migration fails; the template is then gone again.
        """
        resolved = self.resolve(schema)
        if resolved.key not in self._by_key:
            databases = TestDatabases(
                self.server,
                template=cached_template_name(resolved.key) if self.cached else None,
                schema=resolved,
                ahead=self.exai.clones_ahead,
                clock_start=self.exai.clock,
            )
            started = time.perf_counter()
            databases.create_template()
            found = "found in the --exai-reuse cache" if databases.template_exists else None
            self.timings.record("schema", time.perf_counter() - started, found)
            self._by_key[resolved.key] = databases
        return self._by_key[resolved.key]

    def close(self) -> None:
        failures: list[psycopg.Error] = []
        for databases in self._by_key.values():
            try:
                databases.drop_template()
            except psycopg.Error as error:  # drop the others too, then raise
                failures.append(error)
        self._by_key.clear()
        if failures:
            raise failures[0]


def fail_and_stop(request: pytest.FixtureRequest, error: MigrationError) -> NoReturn:
    """Report a schema that cannot be built once, plainly, and stop the run: no test can use it."""
    request.session.shouldstop = "the test template could not be built (see the error above)"
    pytest.fail(f"the test template could not be built:\n{error}", pytrace=False)


def template_databases(templates: Templates, schema: TemplateSchema, request: pytest.FixtureRequest) -> TestDatabases:
    """The databases of ``schema``; a migration that fails is reported once and stops the run."""
    broken: MigrationError | None = None
    try:
        return templates.databases(schema)
    except MigrationError as error:
        broken = error
    fail_and_stop(request, broken)  # outside the except block: no chained traceback
