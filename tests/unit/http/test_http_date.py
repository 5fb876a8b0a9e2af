"""The admin server's Date header is RFC 9110's IMF-fixdate, as email.utils writes it."""

from __future__ import annotations

from email.utils import formatdate

import pytest

from agent.http.server import http_date


@pytest.mark.parametrize("when", [0, 784111777, 951782400, 1700000000.9, 4102444799])
def test_http_date_is_email_utils_gmt_date(when: float) -> None:
    assert http_date(when) == formatdate(when, usegmt=True)


def test_http_date_examples() -> None:
    assert http_date(784111777) == "Sun, 06 Nov 1994 08:49:37 GMT"  # RFC 9110's own example
