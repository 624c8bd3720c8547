"""Suite-wide guard: a time limit per test, with no plugin to install.

A test still running after GPUSTACK_TEST_TIMEOUT seconds (default 30) fails with a
TimeoutError raised in it; one stuck where even that can't reach it ends the run with
every thread's traceback a little later, so a hang costs a minute, not the CI's 90.
"""

import faulthandler
import os
import signal
import sys

import pytest

LIMIT = float(os.environ.get("GPUSTACK_TEST_TIMEOUT", "30"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"{item.nodeid} ran longer than {LIMIT:g}s (GPUSTACK_TEST_TIMEOUT)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, LIMIT)
    faulthandler.dump_traceback_later(LIMIT + 30, exit=True, file=sys.stderr)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
