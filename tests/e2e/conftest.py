"""Every test under tests/e2e/ needs root (network namespaces, most also bcc): each carries the ``root`` marker
(``-m "not root"`` leaves them out) and is skipped when not run as root."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.machine import needs_root

HERE = Path(__file__).parent


@pytest.hookimpl(tryfirst=True)  # before -m selects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.root)
            item.add_marker(needs_root)
