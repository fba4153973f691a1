"""Stopping a training run on a signal without losing work.

SIGINT (Ctrl-C), SIGTERM (a job scheduler's preemption) or SIGHUP (the terminal gone: an ssh
session that dropped) only records the request; the training loop reads it between steps, on every
rank alike (cma_train.distributed.agree_after_step), writes its checkpoint and raises
TrainingStopped. A second Ctrl-C raises KeyboardInterrupt at once. Data-loading workers ignore the
three (cma_model.data.ignore_stop_signals) and leave the stopping to the loop. A hung-up terminal
stops the run rather than leaving it running unseen: torchrun's agent stops its workers on SIGHUP
too, so a run that went on would not do so under torchrun.

SIGPIPE, the reader of the output going away (`cma train | tee log`, and tee stopped), stops
nothing: Python ignores it, so a write raises BrokenPipeError, which OutputMayClose turns into
writes to /dev/null, as it does a hung-up terminal's EIO. A command's record is its files
(checkpoints, metrics.jsonl, results), not its output.
"""
import contextlib
import errno
import os
import signal
import sys
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class TrainingStopped(Exception):
    """Training stopped on a signal after a whole step, its checkpoint written: resume from it."""

    def __init__(self, signum, step, checkpoint):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint: {checkpoint}")


class StopSignals:
    """Context manager for the training loop: a signal of STOP_SIGNALS only records the request
    (`received`: the signal number, 0 before any), which the loop reads between steps; a second
    SIGINT raises KeyboardInterrupt at once. Handlers are installed from the main thread only, and
    restored on exit."""

    def __init__(self, announce=True):
        self.received, self.announce, self._previous = 0, announce, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        if self.announce:
            print(f"\n{signal.Signals(signum).name}: stopping after this step (or evaluation) to write the "
                  f"checkpoint; Ctrl-C again stops at once, keeping the last checkpoint", file=sys.stderr)


class OutputMayClose:
    """A text stream (sys.stdout or sys.stderr) whose reader may go away: the first write or flush
    that fails for that (EPIPE: a pipe's reader closed it; EIO: the terminal hung up) points the
    stream's file descriptor at /dev/null, which takes that write and every later one (and the
    flush at exit), and prints `note` (if any) on stderr. Any other error is raised. Everything else
    is the stream's own."""

    def __init__(self, stream, note=None):
        self._stream, self._note = stream, note

    def write(self, text):
        try:
            return self._stream.write(text)
        except OSError as error:
            self._reader_gone(error)
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except OSError as error:
            self._reader_gone(error)

    def _reader_gone(self, error):
        if error.errno not in (errno.EPIPE, errno.EIO):
            raise error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)
        if self._note:
            print(self._note, file=sys.stderr)

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextlib.contextmanager
def output_may_close():
    """sys.stdout and sys.stderr as OutputMayClose within the block (a `cma` command), flushed at
    its end and then restored."""
    streams = sys.stdout, sys.stderr
    sys.stdout = OutputMayClose(sys.stdout, "note: the reader of cma's standard output went away; cma goes on, "
                                            "its output now discarded")
    sys.stderr = OutputMayClose(sys.stderr)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = streams
