"""How a run ends on a stop signal: Ctrl-C (SIGINT) or SIGTERM becomes a `Stopped` exception in the
main thread, which the command line turns into one line and the exit status shells and schedulers
expect, 128 + the signal's number (130 for SIGINT, 143 for SIGTERM). A second signal while the first
is being handled ends the process at once, as a second Ctrl-C does elsewhere."""
import contextlib
import os
import signal
import sys
import threading

NAMES = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}


class Stopped(BaseException):
    """A stop signal reached the process. `by` says who stopped it; `where` (set by the command that was
    running) says where its results are and how to go on. A BaseException, as KeyboardInterrupt is, so
    that code catching Exception (a candidate that fails is logged and the search goes on) lets it by."""

    def __init__(self, signum, by=None):
        self.signum, self.by, self.where = signum, by or NAMES.get(signum, signal.Signals(signum).name), None
        super().__init__(self.by)

    def line(self):
        """The one line the command line prints."""
        return f"autometa: stopped by {self.by}" + (f"; {self.where}" if self.where else "")

    @property
    def status(self):
        return 128 + self.signum


def raise_stopped(signum, frame=None, by=None):
    """A signal handler: raise Stopped, and let a second signal take its default action (end the process)."""
    for s in NAMES:
        signal.signal(s, signal.SIG_DFL)
    raise Stopped(signum, by)


def speaks():
    """Whether this process says how it stopped. A search's ranks other than 0 do not: rank 0 (or torchrun)
    stops them and speaks for them, so a stop signal ends them at once, with no word, as the system's
    default action does."""
    return int(os.environ.get("WORLD_SIZE", "1")) <= 1 or int(os.environ.get("RANK", "0")) == 0


def while_starting():
    """Until signals_raise: a stop signal ends the process in one line rather than in a traceback from
    inside an import (torch takes seconds to load)."""
    def end(signum, frame):
        print(f"autometa: stopped by {NAMES[signum]} while starting", file=sys.stderr, flush=True)
        os._exit(128 + signum)
    for s in NAMES:
        signal.signal(s, end if speaks() else signal.SIG_DFL)


@contextlib.contextmanager
def signals_raise():
    """Within this block, SIGINT and SIGTERM raise Stopped in the main thread (in a process that speaks(); in
    one that does not, they end it at once); the handlers before are restored after. Outside the main
    thread (where Python cannot set handlers) it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.signal(s, raise_stopped if speaks() else signal.SIG_DFL) for s in NAMES}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def exit_now(status):
    """End the process with `status` without waiting for its other threads (a team's helper thread may be
    in the middle of training a candidate that no one will log)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
