"""cma_train.signals: an output whose reader goes away stops nothing (the stop signals themselves
are tested through training, in test_train.py and test_cli.py)."""
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
