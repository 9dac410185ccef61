"""Alembic migrations for the ``am_`` tables (installed as ``anomaly_monitor.migrations``)."""
