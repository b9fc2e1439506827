"""tdm.outbox against real MLflow stores: writes survive a stopped server, the bound sheds sample grids
before metrics, unsent writes are spilled as JSON lines and replayed (twice is harmless), and the
driver-side pieces (param cut to MLflow's limit, the backlog delivery) behave."""
import io

import pytest
from conftest import MlflowServer, free_port
from mlflow import MlflowClient
from PIL import Image

from tdm.outbox import BACKLOG_DIR, METRIC_BYTES, Outbox, Record, backlog_files, replay, send, shed, spill


def png(color=(255, 0, 0), size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def metric(key, value, step):
    return Record("metrics", rows=[[key, float(value), 1_700_000_000_000 + step, step]])


def history(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.fixture
def local_run(tmp_path):
    """A run in a SQLite store of its own (no server)."""
    client = MlflowClient(f"sqlite:///{tmp_path}/store.db")
    exp = client.create_experiment("outbox", artifact_location=(tmp_path / "artifacts").as_uri())
    return client, client.create_run(exp).info.run_id


def test_record_json_round_trip_keeps_bytes_and_fields():
    for r in (metric("train/loss", 0.25, 3), Record("tag", name="tdm.last_checkpoint", value="s3://b/c"),
              Record("dict", name="checkpoints/step_0000004.json", data={"step": 4, "uri": "x"}),
              Record("image", name="samples_K4", step=4, data=png()),
              Record("file", name="step_0000004.gif", path="samples/K4", data=b"GIF89a\x00\xff")):
        assert Record.from_json(r.to_json()) == r
    assert metric("a", 1, 1).size == METRIC_BYTES and Record("image", data=b"x" * 100).size == 100


def test_send_writes_every_kind_in_order(local_run):
    client, run_id = local_run
    send(client, run_id, [metric("m", 1, 1), metric("m", 2, 2), Record("tag", name="t", value="v"),
                          Record("dict", name="d/x.json", data={"a": 1}), Record("image", name="g", step=2,
                                                                                  data=png()),
                          Record("file", name="v.gif", path="samples/K1", data=b"GIF89a")])
    run = client.get_run(run_id)
    assert history(client, run_id, "m") == [(1, 1.0), (2, 2.0)] and run.data.tags["t"] == "v"
    paths = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(run_id, "d")}
    assert "d/x.json" in paths and "images" in paths
    assert [a.path for a in client.list_artifacts(run_id, "samples/K1")] == ["samples/K1/v.gif"]


def test_writes_made_while_the_server_is_down_arrive_when_it_is_back(tmp_path):
    server = MlflowServer(tmp_path / "server").start()
    try:
        client = MlflowClient(server.uri)
        run_id = client.create_run(client.create_experiment("outage")).info.run_id
        box = Outbox(client, run_id, max_bytes=64 << 20)
        box.put(metric("m", 0, 0))
        server.stop()
        for step in range(1, 50):   # put() returns while nothing answers; it never raises
            box.put(metric("m", step, step))
        box.put(Record("image", name="samples_K4", step=49, data=png()))
        box.put(Record("tag", name="tdm.last_checkpoint", value="/runs/x/checkpoint_0000049"))
        server.start()
        assert box.close(timeout_s=300) == []
        assert history(client, run_id, "m") == [(s, float(s)) for s in range(50)]
        assert client.get_run(run_id).data.tags["tdm.last_checkpoint"].endswith("checkpoint_0000049")
        assert box.dropped == 0 and box.sent == 52
    finally:
        server.stop()


def test_the_bound_sheds_sample_grids_first_then_the_oldest_metrics():
    from collections import deque

    grid = Record("image", name="old", step=1, data=b"g" * 1000)
    tag = Record("tag", name="tdm.last_checkpoint", value="c")          # 256 + 1 bytes
    queue = deque([grid, *(metric("m", s, s) for s in range(5)), tag, Record("image", name="new", data=b"n" * 1000)])
    total = sum(r.size for r in queue)                                  # 1000 + 5 * 64 + 257 + 1000 = 2577
    assert total == 2577
    # 2577 - 1000 (the old grid; the new one is the newest, kept) = 1577 <= 1600: nothing else goes
    assert shed(queue, total, 1600) == (1, 1577) and [r.name for r in queue if r.kind == "image"] == ["new"]
    # then the oldest metrics, one by one: 1577 - 3 * 64 = 1385 <= 1400; the tag stays whatever the bound
    assert shed(queue, 1577, 1400) == (3, 1385) and [r.rows[0][3] for r in queue if r.kind == "metrics"] == [3, 4]
    assert shed(queue, 1385, 0) == (2, 1257) and [r.kind for r in queue] == ["tag", "image"]
    # records being sent (before `start`) are never touched
    queue = deque([grid, metric("m", 0, 0), Record("image", name="new", data=b"n" * 1000)])
    assert shed(queue, 2064, 100, start=1) == (1, 2000) and queue[0] is grid


def test_a_full_outbox_drops_and_counts_while_the_server_is_unreachable():
    # nothing listens on this port: nothing is ever sent, and put() neither blocks nor raises
    box = Outbox(MlflowClient(f"http://127.0.0.1:{free_port()}"), "0" * 32, max_bytes=20 * METRIC_BYTES)
    for step in range(100):
        box.put(metric("m", step, step))
    left = box.close(timeout_s=0)
    steps = [r.rows[0][3] for r in left]
    assert steps == sorted(steps) and steps[-1] == 99 and box.dropped == 100 - len(steps)
    assert 20 <= len(steps) <= 20 + 64 and box.sent == 0    # the bound, plus at most one batch in flight


def test_spilled_writes_replay_into_the_run_once(local_run, tmp_path):
    client, run_id = local_run
    run_dir = str(tmp_path / "runs" / "r")
    records = [metric("m", s, s) for s in range(3)] + [Record("tag", name="t", value="v"),
                                                       Record("image", name="g", step=1, data=png())]
    uri = spill(records, run_dir, "rank0-1")
    assert uri == f"{run_dir}/{BACKLOG_DIR}/rank0-1.jsonl" and backlog_files(run_dir)
    assert not list((tmp_path / "runs" / "r" / BACKLOG_DIR).glob("*.tmp"))
    spill(records[:1], run_dir, "rank0-2")
    assert replay(client, run_id, run_dir) == 6
    assert backlog_files(run_dir) == [] and replay(client, run_id, run_dir) == 0
    assert history(client, run_id, "m") == [(0, 0.0), (1, 1.0), (2, 2.0)]   # the twice-sent metric is kept once
    assert client.get_run(run_id).data.tags["t"] == "v"


def test_a_param_is_cut_to_mlflows_limit_with_a_marker():
    from tdm.job import MAX_PARAM_CHARS, param_value

    assert param_value([1, 2]) == "[1, 2]" and param_value("x" * MAX_PARAM_CHARS) == "x" * MAX_PARAM_CHARS
    cut = param_value("y" * 7000)
    assert len(cut) <= MAX_PARAM_CHARS and cut.startswith("y" * 5000)
    kept = cut.index("...")
    assert cut.endswith(f"... [{7000 - kept} more characters: see config.json]")


def test_delivering_a_backlog_to_an_unreachable_server_stops_before_registering(local_run, tmp_path):
    from tdm.errors import ServiceUnavailableError
    from tdm.job import deliver_backlog

    client, run_id = local_run
    run_dir = str(tmp_path / "runs" / "r")
    deliver_backlog(run_dir, run_id, f"http://127.0.0.1:{free_port()}", "after training")   # nothing saved: no-op
    spill([metric("m", 1, 1)], run_dir, "rank0-1")
    with pytest.raises(ServiceUnavailableError, match=r"^MLFLOW_TRACKING_URI: cannot reach .* 1 file\(s\) of unsent "
                       r"tracking writes are kept in .*run the same command again") as e:
        deliver_backlog(run_dir, run_id, f"http://127.0.0.1:{free_port()}", "after training")
    assert e.value.exit_code == 3 and backlog_files(run_dir)        # kept for the next invocation
    deliver_backlog(run_dir, run_id, f"sqlite:///{tmp_path}/store.db", "before training")
    assert backlog_files(run_dir) == [] and history(client, run_id, "m") == [(1, 1.0)]


def test_a_failure_after_the_run_exists_marks_it_failed_with_the_reason(local_run, tmp_path):
    from tdm.errors import ConfigError
    from tdm.job import _fail_run_on_error

    client, run_id = local_run
    uri = f"sqlite:///{tmp_path}/store.db"
    with pytest.raises(RuntimeError, match="boom"):   # not the server's fault: the error is the caller's to see
        with _fail_run_on_error(run_id, uri):
            raise RuntimeError("boom: http://user:secret@host/x\n  a long traceback-like context")
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["tdm.failure"] == "boom: http://***@host/x"
    run_id = client.create_run(run.info.experiment_id).info.run_id
    with pytest.raises(ConfigError):
        with _fail_run_on_error(run_id, uri):
            raise ConfigError("train.max_steps: too small")
    assert client.get_run(run_id).data.tags["tdm.failure"] == "train.max_steps: too small"


def test_an_error_while_the_server_is_down_is_one_line_naming_it(capsys):
    from tdm.errors import ServiceUnavailableError
    from tdm.job import _fail_run_on_error

    down = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServiceUnavailableError, match=r"^MLFLOW_TRACKING_URI: cannot reach the MLflow server at "
                       r"http://127\.0\.0\.1:\d+ .*the checkpoints are kept: run the same command again") as e:
        with _fail_run_on_error("0" * 32, down):
            raise ConnectionError("Max retries exceeded with url: /api/2.0/mlflow/runs/log-batch")
    assert e.value.exit_code == 3 and "\n" not in str(e.value)
    assert "could not mark MLflow run" in capsys.readouterr().out
