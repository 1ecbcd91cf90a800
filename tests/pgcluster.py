"""Test helper: a throw-away embedded PostgreSQL cluster for the test suite.

Not a test module.  Used from a session-scoped *sync* fixture in ``conftest.py`` (the
cluster must be started from the main thread, see ``imserver.storage.embedded``)::

    cluster = start_test_cluster(tmp_path_factory.mktemp("db"))
    try:
        yield cluster
    finally:
        cluster.stop()
"""

from __future__ import annotations

from pathlib import Path

from imserver.storage.embedded import EmbeddedPostgres


def start_test_cluster(base: Path) -> EmbeddedPostgres:
    """Start a cluster with ``fsync=False`` in ``base/"pg"`` and return it (already running).

    The caller must call ``stop()`` on it.
    """
    cluster = EmbeddedPostgres(base / "pg", fsync=False)
    cluster.start()
    return cluster
