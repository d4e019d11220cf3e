"""Test-session hooks shared by every test module."""

from __future__ import annotations

import pytest

#: id of a setup exception -> (the exception, kept alive so ids are not reused; the first test
#: whose setup raised it).
_SETUP_FAILURES: dict[int, tuple[BaseException, str]] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A module- or session-scoped fixture that failed re-raises the same exception for every
    test that uses it: report it in full once, then one line per dependent test."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "setup" or not report.failed or call.excinfo is None:
        return
    error = call.excinfo.value
    _, first = _SETUP_FAILURES.setdefault(id(error), (error, item.nodeid))
    if first != item.nodeid:
        report.longrepr = f"setup failed as in {first} (a shared fixture; its error is shown there)"
