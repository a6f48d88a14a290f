"""Config -> files: maps with geometry, manifest, failures recorded, cancel/timeout, bad input."""

from __future__ import annotations

import json
import threading

import nibabel as nib
import numpy as np
import pytest
import torch

from esegeta_engine.cli import main
from esegeta_engine.config import parse_config
from esegeta_engine.errors import ConfigError, ModelLoadError, VolumeError
from esegeta_engine.explain import Progress
from esegeta_engine.pipeline import iter_run, run

AFFINE = np.array([[0.0, 0.0, -0.6, 40.0], [-0.4, 0.0, 0.0, 80.0], [0.0, 0.45, 0.0, -30.0], [0, 0, 0, 1.0]])


@pytest.fixture
def case(tmp_path):
    from tiny_models import TinySegNet

    torch.manual_seed(0)
    model = TinySegNet(3)
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([0.0, 0.05]))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    rng = np.random.default_rng(0)
    vol = rng.random((8, 10, 6)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, AFFINE), tmp_path / "vol.nii.gz")
    return tmp_path, model


def config(tmp_path, methods, **over):
    data = {
        "model": {"path": "model.pt", "class_path": "tiny_models:TinySegNet", "kwargs": {"dims": 3}},
        "volumes": ["vol.nii.gz"],
        "target": {"kind": "argmax", "classes": [0, 1]},
        "methods": methods,
        "output": {"dir": "out"},
    }
    for k, v in over.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    return parse_config(data, base=tmp_path)


def test_run_writes_maps_with_source_geometry_and_manifest(case):
    tmp_path, _ = case
    cfg = config(tmp_path, [{"name": "saliency"}, {"name": "integrated_gradients", "params": {"n_steps": 4}}])
    result = run(cfg)
    assert result.status == "completed" and not result.failed
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["status"] == "completed" and manifest["seed"] == 0
    assert {"torch", "captum", "numpy", "nibabel"} <= set(manifest["environment"])
    assert len(manifest["results"]) == 4  # 2 methods x 2 classes
    for rec in manifest["results"]:
        img = nib.load(tmp_path / "out" / rec["file"])
        assert img.shape == (8, 10, 6) and img.get_data_dtype() == np.float32
        assert np.allclose(img.affine, AFFINE)
        assert np.isfinite(np.asarray(img.dataobj)).all()
        assert rec["model_evaluations"] >= 1 and rec["seconds"] >= 0
    pred = nib.load(tmp_path / "out" / manifest["volumes"][0]["prediction"])
    assert np.allclose(pred.affine, AFFINE) and pred.shape == (8, 10, 6)
    assert (tmp_path / "out" / "esegeta.log").read_text().count("done in") == 4


def test_axis_order_maps_back_to_nifti_order(case):
    tmp_path, model = case
    cfg = config(tmp_path, [{"name": "saliency", "params": {"abs": False}}],
                 preprocess={"axis_order": "zyx"}, target={"kind": "argmax", "classes": [1]})
    run(cfg)
    [path] = (tmp_path / "out").glob("vol__saliency__*.nii.gz")
    got = np.asarray(nib.load(path).dataobj)
    # independent: gradient of the class-1 region score computed on the transposed input
    x = torch.from_numpy(np.asarray(nib.load(tmp_path / "vol.nii.gz").dataobj).transpose(2, 1, 0).copy())[None, None]
    x.requires_grad_()
    out = model(x)
    region = (out.detach().argmax(1) == 1).float()
    (out[:, 1] * region).sum().backward()
    assert np.allclose(got, x.grad[0, 0].numpy().transpose(2, 1, 0), atol=1e-6)


def test_failing_method_is_recorded_and_run_continues(case):
    tmp_path, _ = case
    # occlusion window larger than the volume fails at run time; saliency after it must still run
    cfg = config(tmp_path, [{"name": "occlusion", "params": {"window": 64}}, {"name": "saliency"}],
                 target={"classes": [1]})
    result = run(cfg)
    statuses = {r["method"]: r["status"] for r in result.records}
    assert statuses == {"occlusion": "failed", "saliency": "ok"}
    assert "window" in next(r["error"] for r in result.records if r["method"] == "occlusion")
    assert len(list((tmp_path / "out").glob("vol__saliency__*.nii.gz"))) == 1


SLOW = {"class_path": "tiny_models:SlowSegNet", "kwargs": {"dims": 3, "delay": 0.01}}


def test_timeout_is_recorded_and_run_continues(case):
    tmp_path, _ = case
    cfg = config(tmp_path, [{"name": "occlusion", "params": {"window": 1, "perturbations_per_eval": 1}},
                            {"name": "saliency"}],
                 target={"classes": [1]}, run={"timeout_s": 0.3}, model=SLOW)
    result = run(cfg)
    rec = {r["method"]: r for r in result.records}
    assert rec["occlusion"]["status"] == "timeout" and rec["saliency"]["status"] == "ok"


def test_timeout_from_a_non_main_thread(case):
    tmp_path, _ = case
    cfg = config(tmp_path, [{"name": "occlusion", "params": {"window": 1, "perturbations_per_eval": 1}}],
                 target={"classes": [1]}, run={"timeout_s": 0.3}, model=SLOW)
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("r", run(cfg)))
    t.start()
    t.join(30)
    assert box["r"].records[0]["status"] == "timeout"


def test_cancel_keeps_finished_results_and_restores_model(case):
    tmp_path, _ = case
    cfg = config(tmp_path, [{"name": "saliency"}, {"name": "occlusion", "params": {"window": 1, "perturbations_per_eval": 1}},
                            {"name": "input_x_gradient"}], target={"classes": [1]}, model=SLOW)
    cancel = threading.Event()

    def on_progress(event):
        if "occlusion" in event.message and event.evaluations > 3:
            cancel.set()

    for _ in iter_run(cfg, cancel, on_progress=on_progress):
        pass
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["status"] == "cancelled"
    statuses = [(r["method"], r["status"]) for r in manifest["results"]]
    assert statuses == [("saliency", "ok"), ("occlusion", "cancelled")]
    assert (tmp_path / "out" / manifest["results"][0]["file"]).is_file()
    assert not [p for p in (tmp_path / "out").iterdir() if ".part" in p.name]


def test_threaded_run_streams_progress_and_cancels(case):
    tmp_path, _ = case
    cfg = config(tmp_path, [{"name": "saliency"}, {"name": "occlusion", "params": {"window": 1, "perturbations_per_eval": 1}}],
                 target={"classes": [1]}, model=SLOW)
    cancel = threading.Event()
    seen = []
    for event in iter_run(cfg, cancel, threaded=True):
        if isinstance(event, Progress) and "occlusion" in event.message and event.evaluations > 3:
            seen.append(event.evaluations)
            cancel.set()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert seen and manifest["status"] == "cancelled"
    assert [r["status"] for r in manifest["results"]] == ["ok", "cancelled"]


def test_model_unchanged_after_runs_and_errors(case):
    from esegeta_engine.config import MethodConfig, PreprocessConfig, TargetConfig
    from esegeta_engine.explain import Explainer
    from esegeta_engine.io import load_volume

    tmp_path, model = case
    model.train()
    model.conv1.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    vol = load_volume(tmp_path / "vol.nii.gz")
    ex = Explainer(model, PreprocessConfig(), TargetConfig(classes=[1]))
    methods = [MethodConfig(name=n, **kw) for n, kw in [
        ("guided_backprop", {}), ("deeplift", {}), ("layer_gradcam", {"layers": ["conv2"]}),
        ("occlusion", {"params": {"window": 64}})]]  # the last one fails inside Captum's call
    events = list(ex.iter_explain([vol], methods))
    assert sum(type(e).__name__ == "JobFailed" for e in events) == 1
    assert model.training and all(m.training for m in model.modules())
    assert not model.conv1.weight.requires_grad and model.conv2.weight.requires_grad
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_in_memory_volume_with_nan_is_refused(case):
    from esegeta_engine.config import MethodConfig, PreprocessConfig, TargetConfig
    from esegeta_engine.explain import Explainer
    from esegeta_engine.io import Volume

    _, model = case
    data = np.zeros((8, 8, 8), np.float32)
    data[1, 2, 3] = np.nan
    ex = Explainer(model, PreprocessConfig(), TargetConfig(classes=[1]))
    with pytest.raises(VolumeError, match="1 NaN or Inf"):
        list(ex.iter_explain([Volume(data, np.eye(4))], [MethodConfig(name="saliency")]))


def test_existing_run_folder_needs_overwrite(case):
    tmp_path, _ = case
    run(config(tmp_path, [{"name": "saliency"}], target={"classes": [1]}))
    with pytest.raises(ConfigError, match="already holds a finished run"):
        run(config(tmp_path, [{"name": "saliency"}], target={"classes": [1]}))
    run(config(tmp_path, [{"name": "saliency"}], target={"classes": [1]}, output={"overwrite": True}))


def test_bad_inputs_raise_before_writing_maps(case, tmp_path_factory):
    tmp_path, _ = case
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError):
        run(config(tmp_path, [{"name": "saliency"}], model={"path": "junk.pt"}, output={"dir": "o1"}))
    data = np.zeros((4, 4, 4, 2), np.float32)
    nib.save(nib.Nifti1Image(data, AFFINE), tmp_path / "v4d.nii.gz")
    with pytest.raises(VolumeError, match="4"):
        run(config(tmp_path, [{"name": "saliency"}], volumes=["v4d.nii.gz"], output={"dir": "o2"}))
    # nothing is written before the checks that can fail have passed (not even the folder)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


# ---- command line ---------------------------------------------------------------------------

def test_cli_user_errors_are_one_message_without_traceback(case, capsys):
    tmp_path, _ = case
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert "error: config file" in err and "Traceback" not in err
    (tmp_path / "c.yaml").write_text("model: {path: model.pt}\nvolumes: [vol.nii.gz]\nmethods: [{name: salency}]\n")
    assert main(["run", str(tmp_path / "c.yaml")]) == 2
    assert "did you mean saliency" in capsys.readouterr().err
    code = main(["explain", "--model", str(tmp_path / "model.pt"), "--volume", str(tmp_path / "vol.nii.gz"),
                 "--method", "integrated_gradients:n_steps=-1", "--out", str(tmp_path / "x")])
    assert code == 2 and "n_steps" in capsys.readouterr().err


def test_cli_explain_with_flags(case, capsys):
    tmp_path, _ = case
    code = main(["explain", "--model", str(tmp_path / "model.pt"), "--class-path", "tiny_models:TinySegNet",
                 "--kwargs", '{"dims": 3}', "--volume", str(tmp_path / "vol.nii.gz"), "--classes", "1",
                 "--method", "occlusion:window=4,stride=2", "--method", "layer_gradcam:layers=conv2",
                 "--out", str(tmp_path / "cli"), "-q"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "2 of 2 maps written" in out and "occlusion" in out and "layer_gradcam@conv2" in out
    assert len(list((tmp_path / "cli").glob("vol__*__argmax-class1.nii.gz"))) == 2
    assert (tmp_path / "cli" / "vol__prediction.nii.gz").is_file()


def test_cli_methods_and_layers(case, capsys):
    tmp_path, _ = case
    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    for name in ("saliency", "occlusion", "layer_gradcam", "kernel_shap"):
        assert name in listing
    assert main(["methods", "integrated_gradients"]) == 0
    assert "n_steps" in capsys.readouterr().out
    assert main(["layers", str(tmp_path / "model.pt"), "--class-path", "tiny_models:TinySegNet",
                 "--kwargs", '{"dims": 3}']) == 0
    assert "conv2" in capsys.readouterr().out


def test_several_volumes_batch_only_for_batch_methods(case):
    tmp_path, _ = case
    rng = np.random.default_rng(5)
    nib.save(nib.Nifti1Image(rng.random((8, 10, 6)).astype(np.float32), AFFINE), tmp_path / "vol2.nii.gz")
    methods = [{"name": "feature_permutation", "params": {"mask": "grid", "grid_size": 4}},
               {"name": "gradient_shap"}]
    res = run(config(tmp_path, methods, volumes=["vol.nii.gz", "vol2.nii.gz"], target={"classes": [1]}))
    assert sorted((r["method"], r["volume"], r["status"]) for r in res.records) == [
        ("feature_permutation", "vol", "ok"), ("feature_permutation", "vol2", "ok"),
        ("gradient_shap", "vol", "ok"), ("gradient_shap", "vol2", "ok")]
    # a method that expands the batch example-major gives the same map as a one-volume run
    alone = run(config(tmp_path, [{"name": "gradient_shap"}], volumes=["vol2.nii.gz"],
                       target={"classes": [1]}, output={"dir": "alone"}))
    a = np.asarray(nib.load(tmp_path / "out" / "vol2__gradient_shap__argmax-class1.nii.gz").dataobj)
    b = np.asarray(nib.load(alone.out_dir / "vol2__gradient_shap__argmax-class1.nii.gz").dataobj)
    assert np.allclose(a, b, atol=1e-6)
    # one volume: feature permutation fails with a clear message, the run goes on
    one = run(config(tmp_path, methods, target={"classes": [1]}, output={"dir": "one"}))
    fp = next(r for r in one.records if r["method"] == "feature_permutation")
    assert fp["status"] == "failed" and "several volumes" in fp["error"]


def test_model_that_rejects_the_volume_shape_is_padded_or_gives_a_clear_error(case, capsys):
    from esegeta_engine.config import ExecutionConfig
    from esegeta_engine.errors import MethodError
    from esegeta_engine.explain import Explainer
    from esegeta_engine.io import load_volume
    from esegeta_engine.sample.nets import UNet

    tmp_path, _ = case
    torch.save(UNet(3, features=(2, 4, 8)).state_dict(), tmp_path / "unet.pt")  # needs multiples of 4
    code = main(["explain", "--model", str(tmp_path / "unet.pt"), "--class-path", "esegeta_engine.sample.nets:UNet",
                 "--kwargs", '{"features": [2, 4, 8]}', "--volume", str(tmp_path / "vol.nii.gz"),
                 "--method", "saliency", "--out", str(tmp_path / "o"), "-q"])
    err = capsys.readouterr().err
    assert code in (0, 1) and "Traceback" not in err  # padded to multiples of 4, maps cropped back
    maps = list((tmp_path / "o").glob("vol__saliency__*.nii.gz"))
    assert maps and nib.load(maps[0]).shape == (8, 10, 6)
    # with padding switched off, the message names the shape and the fix
    net = UNet(3, features=(2, 4, 8)).eval()
    x = Explainer(net).prepare_input(load_volume(tmp_path / "vol.nii.gz"))
    with pytest.raises(MethodError, match=r"does not accept an input of shape \(1, 1, 8, 10, 6\)") as info:
        Explainer(net, execution=ExecutionConfig(divisible_by=1)).raw_output(x)
    assert "divisible_by" in str(info.value)


def test_unknown_layer_fails_before_any_method_runs(case):
    tmp_path, _ = case
    cfg = config(tmp_path, [{"name": "saliency"}, {"name": "layer_gradcam", "layers": ["conv9"]}],
                 target={"classes": [1]})
    with pytest.raises(ModelLoadError, match="no layer named 'conv9'"):
        run(cfg)
    assert not list((tmp_path / "out").glob("*saliency*"))
