"""The ``dist`` marker's rule: a test that starts processes must carry it (tests/conftest.py).

``pytest -m "not dist"`` is the quick in-process tier; these tests show that a test without the
marker cannot start ranks, subprocesses or multiprocessing children, and that nothing started.
"""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import textwrap

import pytest

from tests import dist_harness
from tests.dist_harness import MissingDistMarker, run_workers


def _worker(rank: int, world_size: int, out_dir: str) -> None:
    open(f"{out_dir}/done{rank}", "w").close()


def _touch(path: str) -> None:
    open(path, "w").close()


def _refused_once(what: str) -> None:
    """The running test was refused exactly once, for ``what``; forget it so that the test may pass."""
    refused = dist_harness.take_refusals()
    assert len(refused) == 1, refused
    assert what in refused[0] and "without the `dist` marker" in refused[0] and "pytest.mark.dist" in refused[0]


def test_run_workers_refuses_a_test_without_the_marker(tmp_path):
    with pytest.raises(MissingDistMarker, match="test_run_workers_refuses_a_test_without_the_marker"):
        run_workers("tests.test_markers:_worker", 2, tmp_path)
    assert list(tmp_path.iterdir()) == []  # not one rank started, no log opened
    _refused_once("run_workers('tests.test_markers:_worker', world_size=2)")


@pytest.mark.parametrize("start", ["run", "Popen", "check_output"])
def test_a_subprocess_is_refused_without_the_marker(tmp_path, start):
    flag = tmp_path / "ran"
    with pytest.raises(MissingDistMarker):
        getattr(subprocess, start)([sys.executable, "-c", f"open({str(flag)!r}, 'w')"])
    assert not flag.exists()
    _refused_once("subprocess")


def test_a_shell_command_is_refused_without_the_marker(tmp_path):
    flag = tmp_path / "ran"
    with pytest.raises(MissingDistMarker):
        subprocess.run(f"touch {flag}", shell=True)
    assert not flag.exists()
    _refused_once(f"touch {flag}")


def test_multiprocessing_is_refused_without_the_marker(tmp_path):
    flag = tmp_path / "ran"
    p = multiprocessing.get_context("spawn").Process(target=_touch, args=(str(flag),))
    with pytest.raises(MissingDistMarker):
        p.start()
    assert not flag.exists()
    _refused_once("multiprocessing")


@pytest.mark.dist
def test_run_workers_starts_ranks_with_the_marker(tmp_path):
    run_workers("tests.test_markers:_worker", 2, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("done*")) == ["done0", "done1"]
    assert dist_harness.take_refusals() == []


_INNER = '''
    import subprocess, sys
    import pytest
    from tests import dist_harness

    FLAG = {flag!r}


    def _start():
        subprocess.run([sys.executable, "-c", f"open({{FLAG!r}}, 'a').write('x')"])


    def test_unmarked_start():
        _start()


    def test_unmarked_start_that_swallows_the_refusal():
        try:
            _start()
        except Exception:
            pass


    @pytest.mark.dist
    def test_marked():
        dist_harness.require_dist_marker("a check without a start")


    @pytest.mark.dist
    class TestMarkedClass:
        def test_in_class(self):
            dist_harness.require_dist_marker("a check without a start")


    @pytest.mark.parametrize("x", [1, pytest.param(2, marks=pytest.mark.dist)])
    def test_one_marked_case(x):
        if x == 1:
            with pytest.raises(dist_harness.MissingDistMarker):
                dist_harness.require_dist_marker("case 1")
            dist_harness.take_refusals()
        else:
            dist_harness.require_dist_marker("case 2")
'''


def test_a_session_fails_unmarked_starts_even_when_the_test_swallows_the_refusal(pytester, tmp_path):
    """A small pytest session in this process, with this suite's conftest rules; nothing starts."""
    flag = tmp_path / "ran"
    pytester.makeconftest("from tests.conftest import dist_marker_checked, pytest_runtest_makereport, "
                          "pytest_runtest_protocol  # noqa: F401\n")
    pytester.makepyfile(test_inner=textwrap.dedent(_INNER.format(flag=str(flag))))
    # -rN: no short summary (it repeats each message in full where CI=1 keeps pytest from cutting lines)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-rN",
                                          "-W", "ignore::pytest.PytestUnknownMarkWarning")
    result.assert_outcomes(passed=5, failed=1, errors=1)
    out = result.stdout.str()
    assert "MissingDistMarker: test_inner.py::test_unmarked_start starts processes" in out, out
    assert "ERROR at teardown of test_unmarked_start_that_swallows_the_refusal" in out, out
    assert out.count("without the `dist` marker") == 2, out  # each refused test says it once
    assert not flag.exists()  # neither unmarked test started its process
    # -m "not dist" runs the unmarked tests only: the marked function, class and parameter are deselected
    quick = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-rN", "-m", "not dist",
                                         "-W", "ignore::pytest.PytestUnknownMarkWarning")
    quick.assert_outcomes(passed=2, failed=1, errors=1, deselected=3)
