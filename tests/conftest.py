"""Settings for the whole test suite.

llama.cpp's worker threads spin at their barriers: with more threads than
free cores (another process busy on this 2-core machine), decoding can stall
from ~85 to under 1 token/s. The tests therefore run the model on one thread,
which a busy machine slows down in proportion instead. Every process the
tests start inherits this; speed is measured by the benchmarks, not here.
"""

import os
from collections.abc import Iterator

import pytest

from tests.postgres_server import PostgresServer

os.environ.setdefault("N_THREADS", "1")


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the whole test session (tests take a
    fresh database each: ``postgres.new_database()``)."""
    with PostgresServer() as server:
        yield server
