"""Suite-wide guard: a time limit per test, with no plugin to install.

A test still running after GPUSTACK_TEST_TIMEOUT seconds (default 30) fails with a
TimeoutError raised in it; one stuck where even that can't reach it ends the run with
every thread's traceback a little later, so a hang costs a minute, not the CI's 90.

It also puts tests/ on sys.path, once for every test file: the fake GPUStack in tests/fakes.py is
``from fakes import ...`` in tests/test_*.py and in test_live_gpustack.py alike. The fake suite's own
fixtures are in tests/conftest.py.
"""

import faulthandler
import os
import signal
import sys
import threading
import time
from typing import Optional

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests"))

LIMIT = float(os.environ.get("GPUSTACK_TEST_TIMEOUT", "30"))


class _Watchdog:
    """Sends SIGALRM to the main thread itself at the deadline.

    A process-wide alarm may be delivered to any thread (the fake server's, say); then the
    main thread, blocked in connect() or recv(), is never interrupted. Aimed at the main
    thread, the signal makes its system call return, and the handler raises there.
    """

    def __init__(self) -> None:
        self._deadline: Optional[float] = None
        self._changed = threading.Condition()
        self._main = threading.main_thread().ident
        threading.Thread(target=self._watch, name="test-watchdog", daemon=True).start()

    def arm(self, seconds: float) -> None:
        with self._changed:
            self._deadline = time.monotonic() + seconds
            self._changed.notify()

    def disarm(self) -> None:
        with self._changed:
            self._deadline = None
            self._changed.notify()

    def _watch(self) -> None:
        with self._changed:
            while True:
                if self._deadline is None:
                    self._changed.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._changed.wait(left)
                    continue
                self._deadline = None
                signal.pthread_kill(self._main, signal.SIGALRM)


_watchdog: Optional[_Watchdog] = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    global _watchdog
    if not hasattr(signal, "pthread_kill") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"{item.nodeid} ran longer than {LIMIT:g}s (GPUSTACK_TEST_TIMEOUT)")

    _watchdog = _watchdog or _Watchdog()
    previous = signal.signal(signal.SIGALRM, expire)
    faulthandler.dump_traceback_later(LIMIT + 30, exit=True, file=sys.stderr)
    _watchdog.arm(LIMIT)
    try:
        yield
    finally:
        _watchdog.disarm()
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, previous)
