"""What the terminal shows (docs/architecture.md, "Terminal output"): progress lines at a bounded rate where
the output is not a terminal, nothing redrawn, control sequences stripped from piped output, and the job's
summary last. The job itself is captured in a TTY and through a pipe in tests/test_families_e2e.py and
test_a_job_in_a_terminal_ends_with_its_summary below."""
import io
import sys
import threading

from tdm.console import (
    LineProgress,
    OutputStream,
    line_due,
    plain_line,
    progress,
    sync_marker,
    sync_token,
    wait_for_sync,
)


def test_line_due_at_each_tenth_rate_limited_and_always_at_the_end():
    assert not line_due(1, 100, 0, 0.0)                      # first item, nothing crossed
    assert line_due(10, 100, 0, 5.0)                        # crossed 10%, 5 s since the last line
    assert not line_due(10, 100, 0, 4.9)                    # crossed, but too soon
    assert not line_due(19, 100, 10, 30.0)                  # within the same tenth
    assert line_due(19, 100, 10, 60.0)                      # a minute without a line: alive
    assert line_due(100, 100, 99, 0.0)                      # the end, however soon
    assert not line_due(100, 100, 100, 99.0)                # never twice for one count
    assert not line_due(7, None, 0, 30.0) and line_due(7, None, 0, 60.0)   # unknown total: time only


def test_line_progress_lines_rate_eta_and_a_last_line_once():
    t = [0.0]
    lines: list[str] = []
    bar = LineProgress(range(20), desc="distill r", clock=lambda: t[0], write=lines.append)
    for _ in bar:
        t[0] += 1.0      # 1 s per item: a tenth (2 items) takes 2 s < 5 s, so a line comes every 5 items
    assert lines == ["distill r: 5/20 (25%), 1.00 s/it, 15s left", "distill r: 10/20 (50%), 1.00 s/it, 10s left",
                     "distill r: 15/20 (75%), 1.00 s/it, 5s left", "distill r: 20/20 (100%), 1.00 s/it, done in 20s"]
    bar.close()
    assert len(lines) == 4


def test_a_resumed_count_rates_only_the_new_items_and_an_early_close_shows_where_it_stopped():
    t = [0.0]
    lines: list[str] = []
    bar = LineProgress(total=600, initial=300, desc="d", clock=lambda: t[0], write=lines.append)
    t[0] = 150.0
    bar.update(150)                       # 150 items in 150 s: crossed 50% -> 70%
    bar.update(10)
    bar.close()
    assert lines == ["d: 450/600 (75%), 1.00 s/it, 2m30s left", "d: 460/600 (77%), 1.1 it/s, 2m11s left"]


def test_progress_off_a_terminal_is_lines_and_yields_everything(capsys):
    assert isinstance(progress(range(3), desc="x"), LineProgress)    # pytest's captured stderr: no terminal
    assert list(progress(range(5), desc="x")) == [0, 1, 2, 3, 4]
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("[tdm] x: 5/5 (100%), ") and lines[0].endswith("done in 0s")


def test_plain_line_keeps_what_a_terminal_would_show():
    assert plain_line("\x1b[36m(pid=12)\x1b[0m [tdm] eval: fid 3.2") == "(pid=12) [tdm] eval: fid 3.2"
    assert plain_line("\rbar  10%|#  |\rbar 100%|###|") == "bar 100%|###|"
    assert plain_line("\rbar 100%|###|\r          \r") is None         # a bar erased at its end
    assert plain_line("") == "" and plain_line("text\r") == "text"     # blank lines and CRLF text survive
    assert plain_line("\x1b[2K\x1b[1A\x1b[Adone") == "done"


def test_plain_stream_writes_whole_plain_lines_from_partial_writes():
    raw = io.StringIO()
    out = OutputStream(raw, plain=True)
    out.write("\x1b[33mwarn")
    out.write("ing\x1b[0m\n\rWriting shards:   0%|")
    for pct in range(10, 101, 10):
        out.write(f"\rWriting shards: {pct:3d}%|")
    assert raw.getvalue() == "warning\n"                     # the bar is held while it redraws ...
    assert out._buf == "\rWriting shards: 100%|"           # ... keeping only its latest state
    out.write("\n[tdm] next\n")
    out.write("partial")
    out.flush()
    assert raw.getvalue() == "warning\nWriting shards: 100%|\n[tdm] next\npartial"
    assert not out.isatty() and out.getvalue   # other attributes are the real stream's


def test_the_summary_ends_with_where_to_see_the_run(capsys):
    from tdm.cli import print_summary
    from tdm.tracking import run_url

    assert run_url("http://user:pw@mlflow:5000/", "3", "ab12") == "http://***@mlflow:5000/#/experiments/3/runs/ab12"
    local = run_url("sqlite:////home/u/.tdm/mlflow.db", "1", "ab12")
    assert local == "mlflow ui --backend-store-uri sqlite:////home/u/.tdm/mlflow.db, then " \
                    "http://127.0.0.1:5000/#/experiments/1/runs/ab12"
    print_summary({"run_name": "r", "run_id": "ab12", "run_url": local, "model_version": "2", "passed": True,
                   "rows": {"student@4": {"nfe": 4, "fid": 1.5, "latency_ms": 3.0}},
                   "columns": [("fid", "FID", ".2f")]})
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2] == "run r (MLflow run ab12): registered version 2, gate passed"
    assert lines[-1] == f"MLflow: {local}" and "student@4" in lines[1] and "1.50" in lines[1]


def test_in_a_terminal_output_passes_through_as_it_comes():
    raw = io.StringIO()
    out = OutputStream(raw, plain=False)
    out.write("\x1b[36m(pid=1)\x1b[0m line\n\rbar  50%|")
    assert raw.getvalue() == "\x1b[36m(pid=1)\x1b[0m line\n\rbar  50%|"     # partial bars drawn at once
    out.write("\rbar 100%|\n")
    assert raw.getvalue().endswith("\rbar 100%|\n")


def test_a_sync_marker_is_dropped_and_releases_its_waiter(monkeypatch):
    """A Ray task's last line (sync_marker), as the driver's log thread prints it (with Ray's prefix, in a
    separate write from its newline, as print() does), releases wait_for_sync and never reaches the output."""
    for plain in (True, False):
        raw = io.StringIO()
        out = OutputStream(raw, plain=plain)
        monkeypatch.setattr(sys, "stdout", out)
        token = sync_token()
        assert token is not None and any(c.isdigit() for c in token)
        worker = io.StringIO()
        monkeypatch.setattr(sys, "stdout", worker)       # the task's own stdout
        print("[tdm] eval student@4: 4/4 (100%)")
        sync_marker(token)
        monkeypatch.setattr(sys, "stdout", out)
        assert not wait_for_sync(token, timeout_s=0.01)          # nothing forwarded yet: times out
        lines = worker.getvalue().splitlines()

        def forward(lines, out):   # Ray's log thread in the driver
            for line in lines:
                print(f"\x1b[36m(_export_and_evaluate pid=7)\x1b[0m {line}", file=out)

        t = threading.Thread(target=forward, args=(lines, out))
        t.start()
        assert wait_for_sync(token, timeout_s=10)
        t.join()
        shown = raw.getvalue()
        assert "eval student@4: 4/4 (100%)" in shown and "tdm-sync" not in shown, shown
        assert ("\x1b" in shown) is not plain


def test_without_an_output_stream_no_marker_is_printed(capsys):
    assert sync_token() is None          # a library caller's stdout: nothing to watch for markers
    sync_marker(None)
    assert not wait_for_sync(None)
    assert capsys.readouterr().out == ""
