"""The progress bar reports counts, rate and ETA, on a terminal and in logs."""

import io

from flair_tf.progress import Progress, track


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_log_mode_writes_final_line_with_counts():
    out = io.StringIO()
    with Progress(total=4, desc="convert", unit="patch", stream=out, log_every_s=3600) as bar:
        for _ in range(4):
            bar.update()
    lines = out.getvalue().strip().splitlines()
    # First update draws once (interval starts at 0), close draws the final line.
    assert lines[-1].startswith("convert [")
    assert "4/4" in lines[-1] and "100.0%" in lines[-1] and "patch/s" in lines[-1] and "ETA" in lines[-1]
    assert "\r" not in out.getvalue()


def test_tty_mode_redraws_in_place():
    out = _Tty()
    items = list(track(range(3), desc="x", stream=out))
    assert items == [0, 1, 2]
    text = out.getvalue()
    assert text.startswith("\r") and text.endswith("\n") and "3/3" in text


def test_disabled_is_silent_and_unknown_total_has_no_eta():
    out = io.StringIO()
    with Progress(total=None, stream=out, enabled=False) as bar:
        bar.update(5)
    assert out.getvalue() == ""
    bar2 = Progress(total=None, desc="d", stream=out)
    bar2.update(2)
    assert "ETA" not in bar2.line() and "2 it" in bar2.line()
