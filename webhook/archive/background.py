"""A daemon thread for work that comes and goes: started when work arrives, ended once idle."""

from __future__ import annotations

import threading


class OnDemandThread:
    """Runs `_serve` on one daemon thread while there is work, for the lease keeper and the
    media watchdog (a thread started for each job or download cost about 0.2 ms of it:
    `Thread.start` waits for the new thread to run).

    `_wake` starts the thread when none runs. `_serve` returns once idle, and clears `_running`
    under `_lock` in the same hold that found no work, so work added afterwards starts another
    thread instead of waiting on one that is leaving. A thread that fails clears it too."""

    def __init__(self, name: str) -> None:
        self._thread_name = name
        self._lock = threading.Condition()
        self._running = False

    def _wake(self) -> bool:
        """With `_lock` held: start the thread unless one runs; whether one already ran (a
        thread that cannot start raises, and nothing is left running)."""
        if self._running:
            return True
        threading.Thread(target=self._run, name=self._thread_name, daemon=True).start()
        self._running = True  # under the lock the thread takes before it looks
        return False

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException:
            with self._lock:  # the next `_wake` starts another
                self._running = False
            raise

    def _serve(self) -> None:
        raise NotImplementedError
