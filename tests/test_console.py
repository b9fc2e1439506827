"""Progress bars: a Ray bar is closed when its loop ends (an open one is redrawn around every later line
the driver prints, which garbled the job's final summary)."""
from tdm.console import RayBar, progress


class Bar:
    def __init__(self, items):
        self.items, self.closed = items, False

    def __iter__(self):
        return iter(self.items)

    def close(self):
        self.closed = True


def test_a_ray_bar_closes_when_its_loop_ends_or_breaks():
    bar = Bar([1, 2, 3])
    assert list(RayBar(bar)) == [1, 2, 3] and bar.closed
    bar = Bar([1, 2, 3])
    loop = iter(RayBar(bar))
    for x in loop:
        if x == 2:
            break
    assert not bar.closed
    loop.close()  # what the interpreter does when the loop's generator is dropped
    assert bar.closed


def test_a_ray_bar_with_a_total_closes_when_told():
    bar = Bar([])
    bar.update = lambda n=1: setattr(bar, "n", getattr(bar, "n", 0) + n)
    wrapped = RayBar(bar)
    wrapped.update(3)
    wrapped.close()
    assert bar.n == 3 and bar.closed


def test_progress_outside_ray_is_plain_tqdm_and_yields_everything():
    assert list(progress(range(5), desc="x", disable=True)) == [0, 1, 2, 3, 4]


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
