"""cma_model.progress: tqdm's bar on a terminal, lines in a log file."""
import io
import re
import sys

import pytest

from cma_model import progress
from cma_model.progress import progress_bar


def _run_bar(updates):
    bar = progress_bar(total=updates, desc="work", unit="item")
    for _ in range(updates):
        bar.set_postfix(loss="1.0", refresh=False)
        bar.update(1)
    bar.close()


@pytest.mark.parametrize("interval, counts", [(3600, [0, 100]), (0, list(range(101)))])
def test_off_a_terminal_the_bar_is_lines_at_most_one_per_interval(monkeypatch, capsys, interval, counts):
    """A log gets whole lines (no carriage return), ASCII; a long interval leaves the first and the
    last, none leaves one per update."""
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", interval)
    _run_bar(100)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert all(re.fullmatch(r"work: +[0-9]+%\|[#0-9 ]{10}\| [0-9]+/100 \[.*\]", line) for line in lines), lines
    assert sorted({int(re.search(r"\| ([0-9]+)/100", line)[1]) for line in lines}) == counts
    assert lines[-1].startswith("work: 100%|##########| 100/100 [") and lines[-1].endswith(", loss=1.0]")


def test_on_a_terminal_it_is_tqdms_own_bar(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    _run_bar(5)
    assert "\rwork: 100%|" in terminal.getvalue()   # redrawn in place


def test_a_disabled_bar_says_nothing(capsys):
    bar = progress_bar(total=3, desc="work", disable=True)
    bar.update(3)
    bar.close()
    assert capsys.readouterr().err == ""
