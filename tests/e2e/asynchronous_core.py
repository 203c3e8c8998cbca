"""``python -m tests.e2e.asynchronous_core``: the inference core with one
thing undone, for a negative control. Its PostgreSQL store commits with
``synchronous_commit = off``, as it would without its own ``SET
synchronous_commit TO on``: an exchange is then acknowledged before its
commit reaches the write-ahead log, and a crash of the server can lose it.

``test_replicas.py`` runs the same load, the same ``kill -9`` of PostgreSQL
and the same check of every acknowledged exchange against this core, to show
that the check does catch lost exchanges. Nothing else differs from
``python -m inference_server``.
"""

from __future__ import annotations

from typing import Any

import psycopg

from inference_server.__main__ import main
from inference_server.postgres_sessions import PostgresSessionStore

durable_connect = PostgresSessionStore._connect


def asynchronous_connect(store: PostgresSessionStore) -> psycopg.Connection[Any]:
    connection = durable_connect(store)
    connection.execute("SET synchronous_commit TO off")  # after the store's own SET
    return connection


if __name__ == "__main__":
    PostgresSessionStore._connect = asynchronous_connect  # type: ignore[method-assign, assignment]
    main()
