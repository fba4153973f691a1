"""cma_train.signals: an output whose reader goes away stops nothing (the stop signals themselves
are tested through training, in test_train.py and test_cli.py)."""
import errno
import io
import os
import sys

import pytest

from cma_train.signals import OutputMayClose, output_may_close


def _pipe_stream():
    """(read fd, a buffered text stream writing into the pipe), as stdout is when piped."""
    read_fd, write_fd = os.pipe()
    return read_fd, io.TextIOWrapper(io.BufferedWriter(io.FileIO(write_fd, "w")), encoding="utf-8")


def _points_at_devnull(fd):
    return os.path.samestat(os.fstat(fd), os.stat(os.devnull))


@pytest.mark.parametrize("first", ["write", "flush"])
def test_a_write_after_the_reader_went_away_goes_to_devnull_and_says_so_once(first, capsys):
    """Text reaches the reader while it reads; once it has gone, the write or flush that meets the
    broken pipe (and any after it, and the flush at exit) goes to /dev/null instead of raising,
    and the note is said once."""
    read_fd, stream = _pipe_stream()
    out = OutputMayClose(stream, "note: gone")
    out.write("line 1\n")
    out.flush()
    assert os.read(read_fd, 100) == b"line 1\n"
    os.close(read_fd)
    out.write("x" * 100_000 if first == "write" else "line 2\n")   # more than the buffer: the write meets the pipe
    out.flush()
    for i in range(100):
        out.write(f"line {i}\n")
        out.flush()
    assert _points_at_devnull(stream.fileno())
    assert capsys.readouterr().err == "note: gone\n"
    stream.close()


class _Terminal:
    """A terminal's stream: writes fail with `error` (EIO: it hung up) until its descriptor points
    elsewhere."""

    def __init__(self, error):
        self.error = error
        self._read_fd, self._fd = os.pipe()

    def write(self, text):
        if not _points_at_devnull(self._fd):
            raise OSError(self.error, os.strerror(self.error))
        return len(text)

    def flush(self):
        pass

    def fileno(self):
        return self._fd


def test_a_terminal_that_hung_up_is_a_reader_gone_and_other_write_errors_are_raised(capsys):
    hung_up = OutputMayClose(_Terminal(errno.EIO), "note: gone")
    for _ in range(3):
        assert hung_up.write("line\n") == 5
    assert _points_at_devnull(hung_up.fileno()) and capsys.readouterr().err == "note: gone\n"
    full = OutputMayClose(_Terminal(errno.ENOSPC))
    with pytest.raises(OSError, match="No space left on device"):
        full.write("line\n")
    assert not _points_at_devnull(full.fileno())


def test_other_errors_are_raised_and_the_rest_is_the_streams():
    read_fd, stream = _pipe_stream()
    out = OutputMayClose(stream)
    assert not out.isatty() and out.encoding == "utf-8" and out.fileno() == stream.fileno()
    stream.close()
    os.close(read_fd)
    with pytest.raises(ValueError, match="closed file"):
        out.write("after close\n")


def test_output_may_close_wraps_stdout_and_stderr_only_within_the_block():
    streams = sys.stdout, sys.stderr
    with output_may_close():
        assert isinstance(sys.stdout, OutputMayClose) and isinstance(sys.stderr, OutputMayClose)
        print("through the wrapper")
    assert (sys.stdout, sys.stderr) == streams
