"""The test infrastructure's own failure reports: short, and saying what to do."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import tests.dist as dist_pool

pytest_plugins = ["pytester"]


def test_a_failed_shared_fixture_is_one_line_for_each_dependant(pytester: pytest.Pytester):
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture(scope="module")
        def broken():
            raise RuntimeError("the one real error")

        def test_a(broken): pass
        def test_b(broken): pass
        def test_c(broken): pass
        """
    )
    result = pytester.runpytest("-q")
    result.assert_outcomes(errors=3)
    out = result.stdout.str()
    assert out.count("E       RuntimeError: the one real error") == 1  # one traceback, test_a's
    own_lines = [line for line in out.splitlines() if line.startswith("setup failed as in ")]
    assert len(own_lines) == 2  # test_b's and test_c's report, one line each


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def test_a_hung_rank_names_the_timeout_variable_and_stops_the_pool(monkeypatch):
    monkeypatch.setattr(dist_pool, "_TIMEOUT_S", 1.0)
    with dist_pool.ProcessGroupPool(1) as pool:
        with pytest.raises(RuntimeError, match="set TIEDLORA_TEST_RANK_TIMEOUT to more seconds"):
            pool.run(_sleep, 60)
        with pytest.raises(RuntimeError, match="not run: .* stopped after _sleep timed out"):
            pool.run(_sleep, 0)
