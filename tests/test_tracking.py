"""The per-node model cache ($TDM_HOME/cache/models) against two real MLflow registries that share one
$TDM_HOME: each registry's `name` version 1 is its own model, never the other's cached download."""
import mlflow
import torch

from tdm.backbones import load_backbone
from tdm.generation import TDMPipeline
from tdm.spec import model_spec
from tdm.tracking import download_model, get_or_create_experiment, log_pipeline_model, register, use_tracking_uri


def _register_in(store_uri: str, tiny_toy_dir, out, seed: int):
    """Register a tiny toy student whose weights depend on `seed` as version 1 of 'cache-test' in `store_uri`."""
    use_tracking_uri(store_uri)
    b = load_backbone(tiny_toy_dir)
    spec = model_spec(b, "student", 1, 1.0, grids={1: [999]})
    torch.manual_seed(seed)
    student = b.trainable_copy()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    TDMPipeline(b, spec, denoiser=student).save_pretrained(out)
    with mlflow.start_run(run_name=f"cache-test-{seed}", experiment_id=get_or_create_experiment("tdm")):
        info = log_pipeline_model(out, spec)
    return register(info.model_uri, "cache-test", {"kind": "student"})


def test_same_name_and_version_in_two_registries_are_cached_apart(tdm_home, tiny_toy_dir, tmp_path):
    images = []
    for i, store in enumerate(("a", "b")):
        mv = _register_in(f"sqlite:///{tmp_path / store}.db", tiny_toy_dir, tmp_path / f"pipe_{store}", seed=i)
        assert str(mv.version) == "1"                      # the same name and number in both registries
        path = download_model(mlflow.MlflowClient().get_model_version("cache-test", "1"))
        assert download_model(mv) == path                  # a second call reuses the download
        images.append(TDMPipeline.from_pretrained(path)(["a handwritten digit 3"], seeds=[0]))
        # what each registry holds, loaded without the cache
        direct = TDMPipeline.from_pretrained(tmp_path / f"pipe_{store}")(["a handwritten digit 3"], seeds=[0])
        assert torch.equal(images[-1], direct)
    assert not torch.equal(images[0], images[1])


def test_an_experiment_created_between_lookup_and_insert_is_reused(tmp_path, monkeypatch):
    """Two jobs starting at once both miss the lookup; the second insert hits the unique name and must
    return the first job's experiment, not fail (a thread of the multi-node test once died of this)."""
    use_tracking_uri(f"sqlite:///{tmp_path / 'race.db'}")
    first = mlflow.create_experiment("raced")          # the other job won the race
    real = mlflow.get_experiment_by_name
    calls = []

    def stale_lookup(name):
        calls.append(name)
        return None if len(calls) == 1 else real(name)  # this job looked before the other job's insert
    monkeypatch.setattr(mlflow, "get_experiment_by_name", stale_lookup)
    assert get_or_create_experiment("raced") == first
    assert calls == ["raced", "raced"]
