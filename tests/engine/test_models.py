"""Model loading (TorchScript, state dict + class, pickled module refused) and the model guard."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from esegeta_engine.errors import ModelLoadError
from esegeta_engine.models import (
    OutputSelector,
    get_layer,
    import_class,
    is_torchscript,
    list_layers,
    load_model,
    model_guard,
)

CLASS = "tiny_models:TinySegNet"


def _save_state(tmp_path, dims=3):
    from tiny_models import TinySegNet

    m = TinySegNet(dims)
    path = tmp_path / "model.pt"
    torch.save(m.state_dict(), path)
    return m, path


def test_state_dict_with_class_path(tmp_path):
    m, path = _save_state(tmp_path)
    loaded = load_model(path, class_path=CLASS, kwargs={"dims": 3})
    x = torch.rand(1, 1, 6, 6, 6)
    assert torch.allclose(loaded(x), m(x))
    assert not loaded.training


def test_state_dict_in_checkpoint_and_dataparallel_prefix(tmp_path):
    m, _ = _save_state(tmp_path)
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in m.state_dict().items()}}, path)
    loaded = load_model(path, class_path=CLASS, kwargs={"dims": 3})
    x = torch.rand(1, 1, 6, 6, 6)
    assert torch.allclose(loaded(x), m(x))


def test_torchscript(tmp_path):
    from tiny_models import TinySegNet

    m = TinySegNet(2).eval()
    path = tmp_path / "ts.pt"
    torch.jit.script(m).save(str(path))
    loaded = load_model(path)
    assert is_torchscript(loaded)
    x = torch.rand(1, 1, 8, 8)
    assert torch.allclose(loaded(x), m(x))


def test_state_dict_needs_class_path(tmp_path):
    _, path = _save_state(tmp_path)
    with pytest.raises(ModelLoadError, match="class_path"):
        load_model(path)


def test_state_dict_that_does_not_fit(tmp_path):
    _, path = _save_state(tmp_path)
    with pytest.raises(ModelLoadError, match="does not fit") as info:
        load_model(path, class_path=CLASS, kwargs={"dims": 3, "classes": 5})
    assert "kwargs" in info.value.fix
    assert "head.weight (2, 4, 1, 1, 1) vs (5, 4, 1, 1, 1)" in info.value.problem
    assert len(info.value.problem) < 400


def test_pickled_module_refused_without_trust(tmp_path):
    from tiny_models import TinySegNet

    path = tmp_path / "whole.pt"
    torch.save(TinySegNet(3), path)
    with pytest.raises(ModelLoadError, match="pickled") as info:
        load_model(path)
    assert "--trust-pickled" in info.value.fix
    assert isinstance(load_model(path, trust_pickled=True), nn.Module)
    with pytest.raises(ModelLoadError, match="trust"):
        load_model(path, format="pickled_module")


def test_not_a_model_file(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"xyz" * 100)
    with pytest.raises(ModelLoadError, match="not a PyTorch model file"):
        load_model(path)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "missing.pt")


def test_import_class_errors():
    with pytest.raises(ModelLoadError, match="form package.module:Class"):
        import_class("not a path!")
    with pytest.raises(ModelLoadError, match="cannot import"):
        import_class("no_such_module_xyz:Net")
    with pytest.raises(ModelLoadError, match="no attribute"):
        import_class("tiny_models:Nope")


def test_cuda_device_refused_without_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    _, path = _save_state(tmp_path)
    with pytest.raises(ModelLoadError, match="no usable CUDA"):
        load_model(path, class_path=CLASS, kwargs={"dims": 3}, device="cuda:0")


class MultiOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        return {"main": y, "aux": y[:, :, ::2, ::2, ::2]}


def test_output_selection():
    x = torch.rand(1, 1, 4, 4, 4)
    m = MultiOut()
    assert OutputSelector(m, "main")(x).shape == (1, 2, 4, 4, 4)
    with pytest.raises(ModelLoadError, match="keys"):
        OutputSelector(m, None)(x)

    class Tup(nn.Module):
        def forward(self, x):
            return x, x[..., :2]

    assert OutputSelector(Tup(), 1)(x).shape[-1] == 2
    with pytest.raises(ModelLoadError, match="deep supervision"):
        OutputSelector(Tup(), 5)(x)


def test_layers_listing_and_lookup():
    from tiny_models import TinySegNet

    m = TinySegNet(3)
    names = [n for n, _ in list_layers(m)]
    assert names == ["conv1", "relu1", "conv2", "relu2", "head"]
    assert get_layer(m, "conv2") is m.conv2
    with pytest.raises(ModelLoadError, match="conv2"):
        get_layer(m, "conv22")


def test_layers_of_a_torchscript_model_name_their_scripted_types():
    """``esegeta layers`` on a TorchScript file said ``RecursiveScriptModule`` for every module."""
    from tiny_models import TinySegNet

    plain = list_layers(TinySegNet(3))
    assert list_layers(torch.jit.script(TinySegNet(3))) == plain
    assert dict(plain)["conv1"] == "Conv3d"


def test_guard_restores_training_flags_requires_grad_and_hooks():
    from tiny_models import TinySegNet

    m = TinySegNet(3).train()
    m.conv1.weight.requires_grad_(False)
    kept = m.conv2.register_forward_hook(lambda *a: None)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(RuntimeError):
        with model_guard(m):
            assert not m.training
            m.relu1.register_forward_hook(lambda *a: None)
            m.conv2.register_full_backward_hook(lambda *a: None)
            for p in m.parameters():
                p.requires_grad_(True)
            raise RuntimeError("boom inside a method")
    assert m.training and all(mod.training for mod in m.modules())
    assert not m.conv1.weight.requires_grad and m.conv2.weight.requires_grad
    assert not m.relu1._forward_hooks and not m.conv2._backward_hooks
    assert list(m.conv2._forward_hooks) == [kept.id]
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
