"""Ctrl-C for a training run: at once during start-up, between two steps once training runs,
and never lost.

During start-up (importing JAX, reading data, building the model, compiling) Ctrl-C raises
``KeyboardInterrupt`` at once, as Python's own handler does. A ``KeyboardInterrupt`` can be
lost, though: raised inside a callback that a library (or JAX's C++ code) calls and that
catches what it raises, it vanishes and the run goes on. So the handler also counts each
Ctrl-C, and the run calls :meth:`Sigint.check` at the points between its phases, which raises
``KeyboardInterrupt`` again for a Ctrl-C that did not end it. Once the first step has run,
:meth:`Sigint.defer` turns the first Ctrl-C into a request that the loop honours between two
steps (where the run is consistent and can be checkpointed); a second one raises at once.

Python runs a signal handler in the main thread between two bytecodes, so a Ctrl-C during a
long call into XLA (a compilation) takes effect when that call returns.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Sigint:
    """The SIGINT handler of a run (see the module docstring).

    Attributes:
      received: how many Ctrl-C arrived.
      deferred: whether the first Ctrl-C is a request for the loop (after :meth:`defer`)
        instead of an immediate ``KeyboardInterrupt``.
    """

    def __init__(self):
        self.received = 0
        self.deferred = False

    def __call__(self, signum, frame) -> None:
        del signum, frame
        self.received += 1
        if not self.deferred or self.received > 1:
            raise KeyboardInterrupt

    def check(self) -> None:
        """Raises ``KeyboardInterrupt`` if a Ctrl-C arrived during start-up (its own
        ``KeyboardInterrupt`` was then lost, or this would not run)."""
        if self.received and not self.deferred:
            raise KeyboardInterrupt

    def defer(self) -> None:
        """From now on, the first Ctrl-C only sets :attr:`received` (after a last
        :meth:`check`)."""
        self.check()
        self.deferred = True

    @property
    def stop_requested(self) -> bool:
        """Whether a deferred Ctrl-C asks the loop to stop."""
        return self.deferred and self.received > 0


@contextlib.contextmanager
def handling_sigint() -> Iterator[Sigint]:
    """Makes a :class:`Sigint` the SIGINT handler for the block and yields it; Python's default
    handler is back afterwards. Inside another such block it yields that block's handler. In
    a thread other than the main one, or over an application's own handler, it installs
    nothing and yields a handler that never receives."""
    current = signal.getsignal(signal.SIGINT)
    if isinstance(current, Sigint):
        yield current
        return
    sigint = Sigint()
    if (
        threading.current_thread() is not threading.main_thread()
        or current is not signal.default_int_handler
    ):
        yield sigint
        return
    signal.signal(signal.SIGINT, sigint)
    try:
        yield sigint
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
