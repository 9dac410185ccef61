"""Reads slower than the built-in statement timeout: the URL's own timeout wins."""

from __future__ import annotations

import sqlalchemy as sa


def test_the_urls_statement_timeout_wins_on_the_server(pg_url):
    from anomaly_monitor.db import create_engine

    for url, expected in ((pg_url, "1min"),
                          (pg_url + "?options=-c%20statement_timeout%3D5000", "5s")):
        engine = create_engine(url)
        with engine.connect() as connection:
            assert connection.execute(sa.text("SHOW statement_timeout")).scalar() == expected
        engine.dispose()
