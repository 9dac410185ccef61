"""No piece of a password shows in a masked URL or an error message, however the URL is
written (an unescaped ``@``, ``/`` or ``:`` in the password, a bad port)."""

from __future__ import annotations

import pytest

from anomaly_monitor.db import describe_error, redact


@pytest.mark.parametrize(("url", "password", "masked"), [
    ("postgresql://monitor:p@ss/w:rd@127.0.0.1:5432/db", "p@ss/w:rd",
     "postgresql://monitor:***@127.0.0.1:5432/db"),
    ("postgresql://monitor:s3cr@t@db:5432/x", "s3cr@t", "postgresql://monitor:***@db:5432/x"),
    ("postgresql://am:pw-secret@db:notaport/x", "pw-secret",
     "postgresql://am:***@db:notaport/x"),
    ("postgresql://u:p%40ss@h/db?password=zzzz", "zzzz",
     "postgresql://u:***@h/db?password=***"),
    # unescaped '?', '#', '%' and '&' in the password (found by an operator trial)
    ("postgresql+psycopg://operator:p@ss:w/rd#%?&1@127.0.0.1:55439/db", "p@ss:w/rd#%?&1",
     "postgresql+psycopg://operator:***@127.0.0.1:55439/db"),
    ("postgresql+psycopg://operator:p@ss?w@127.0.0.1:55439/db", "p@ss?w",
     "postgresql+psycopg://operator:***@127.0.0.1:55439/db"),
])
def test_the_password_never_shows(url, password, masked):
    assert redact(url) == masked
    for piece in (password, *password.replace("@", " ").replace("/", " ").split()):
        if len(piece) >= 3:
            assert piece not in redact(url)
    host = url.rsplit("@", 1)[1].split("/")[0]
    leaked = ValueError(f'could not translate host name "{url.split("@", 1)[1]}" ({host})')
    message = describe_error(leaked, url)
    assert password not in message and "ss/w:rd" not in message and "t@db" not in message


def test_urls_without_a_password_are_kept():
    assert redact("sqlite:///x.db") == "sqlite:///x.db"
    assert redact("postgresql://u@h/db") == "postgresql://u@h/db"
