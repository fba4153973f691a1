"""Progress bars that suit where the output goes: tqdm's bar on a terminal; in a log file (a batch
job's), the same text as lines, at most one every LOG_INTERVAL_S, since a bar's carriage returns
would make the whole log one line."""
import sys

from tqdm import tqdm

LOG_INTERVAL_S = 60


class _Lines:
    """tqdm's output off a terminal: each refresh becomes a line of stderr (the clearing ones none)."""

    def write(self, text):
        text = text.strip()
        if text:
            sys.stderr.write(text + "\n")

    def flush(self):
        sys.stderr.flush()


def progress_bar(iterable=None, disable=False, **kwargs):
    """tqdm(iterable, disable=disable, **kwargs) where stderr is a terminal; elsewhere the same
    bar written as ASCII lines, at most one every LOG_INTERVAL_S (and the last one at close).
    set_postfix(..., refresh=False) between updates, or each call writes a line."""
    if disable or sys.stderr.isatty():
        return tqdm(iterable, disable=disable, **kwargs)
    return tqdm(iterable, file=_Lines(), mininterval=LOG_INTERVAL_S, maxinterval=max(LOG_INTERVAL_S, 1), ascii=True,
                position=0, **kwargs)   # position 0: a bar inside another (an evaluation in training) moves no cursor
