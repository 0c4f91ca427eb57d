"""Image training: ResNet-18 steps with both wrappers, checkpoints and resumption, bfloat16."""

from __future__ import annotations

import copy
import importlib.util
import re
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metafair_opt import GradientAlignmentWrapper, SampleReweighter

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("timm") is None or importlib.util.find_spec("torchvision") is None,
    reason='vision tests need pip install "metafair-opt[vision]"',
)


def tiny_config(**overrides):
    from metafair_opt.integrations.vision.training import VisionConfig

    settings = {"dataset": "colored-digits", "epochs": 1, "batch_size": 8,
                "max_steps_per_epoch": 2, "device": "cpu", "min_per_group": 4,
                "extra": {"image_size": 16}}
    return VisionConfig(**{**settings, **overrides})


@pytest.mark.parametrize("method", ["forml", "faalgrad"])
def test_resnet18_steps_with_each_wrapper(method: str) -> None:
    from metafair_opt.integrations.vision.models import build_resnet18
    from metafair_opt.integrations.vision.training import train_vision

    torch.manual_seed(0)
    initial = build_resnet18(2, small_input=True).state_dict()
    metrics, model = train_vision(tiny_config(method=method), quiet=True)
    assert model.training  # BatchNorm was in train mode for the steps
    assert 0.0 <= metrics["accuracy"] <= 1.0
    changed = [name for name, value in model.state_dict().items()
               if value.is_floating_point() and not torch.equal(value, initial[name])]
    assert "conv1.weight" in changed and "fc.weight" in changed
    assert int(model.bn1.num_batches_tracked) == 2  # one update per step
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(("method", "option"), [("forml", "recompute_forward"),
                                                ("faalgrad", "recompute_support")])
def test_recomputing_trains_the_same_model(method: str, option: str) -> None:
    """--recompute-forward (FORML) and --recompute-support (FaAlGrad) change how the step is
    computed, not what it computes."""
    from metafair_opt.integrations.vision.training import train_vision

    runs = {}
    for recompute in (False, True):
        config = tiny_config(method=method, **{option: recompute})
        runs[recompute] = train_vision(config, quiet=True)
    (metrics, kept), (metrics_recomputed, recomputed) = runs[False], runs[True]
    assert metrics == pytest.approx(metrics_recomputed, abs=1e-6, nan_ok=True)
    for (name, a), b in zip(kept.state_dict().items(), recomputed.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-6), name


def test_recomputing_with_another_method_is_refused() -> None:
    with pytest.raises(ValueError, match=re.escape(
            "recompute_forward applies to FORML's reweighter only; method='faalgrad' has no "
            "training forward to recompute. Drop --recompute-forward or use --method forml.")):
        tiny_config(method="faalgrad", recompute_forward=True).resolved()
    with pytest.raises(ValueError, match=re.escape(
            "recompute_support applies to FaAlGrad's alignment wrapper only; method='forml' "
            "has no support set to recompute. Drop --recompute-support or use --method "
            "faalgrad.")):
        tiny_config(method="forml", recompute_support=True).resolved()


def test_resume_continues_exactly(tmp_path) -> None:
    from metafair_opt.integrations.vision.training import train_vision

    full = tmp_path / "full"
    _, uninterrupted = train_vision(tiny_config(method="forml", epochs=2, checkpoint=str(full)),
                                    quiet=True)
    part = tmp_path / "part"
    train_vision(tiny_config(method="forml", epochs=1, checkpoint=str(part)), quiet=True)
    first = torch.load(part / "last.pt", weights_only=False)
    assert first["epoch"] == 1
    _, resumed = train_vision(tiny_config(method="forml", epochs=2, checkpoint=str(part),
                                          resume=True), quiet=True)
    for (name, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    saved_full = torch.load(full / "last.pt", weights_only=False)
    saved_part = torch.load(part / "last.pt", weights_only=False)
    assert torch.equal(saved_full["wrapper"]["weights"], saved_part["wrapper"]["weights"])
    assert saved_full["wrapper"]["weights"].abs().max() > 0


def test_interrupted_sgd_faalgrad_run_resumes_exactly(tmp_path, monkeypatch) -> None:
    """SGD with Nesterov momentum and a step schedule (decays after epochs 1 and 2 of 3)."""
    from metafair_opt.integrations.vision import training

    config = {"method": "faalgrad", "optimizer": "sgd", "lr": 0.05, "epochs": 3}
    _, uninterrupted = training.train_vision(tiny_config(**config), quiet=True)

    saves = {"n": 0}
    real_save = training.save_checkpoint

    def save_then_crash(state, path):
        real_save(state, path)
        saves["n"] += 1
        if saves["n"] == 1:
            raise KeyboardInterrupt  # the run dies right after its first checkpoint

    monkeypatch.setattr(training, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        training.train_vision(tiny_config(**config, checkpoint=str(tmp_path)), quiet=True)
    _, resumed = training.train_vision(
        tiny_config(**config, checkpoint=str(tmp_path), resume=True), quiet=True)
    for (name, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="The checkpoint was written by a run with other"):
        training.train_vision(tiny_config(**{**config, "lr": 0.1}, checkpoint=str(tmp_path),
                                          resume=True), quiet=True)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path) -> None:
    from metafair_opt.integrations.vision.training import train_vision

    with pytest.raises(FileNotFoundError, match="--resume needs a checkpoint at"):
        train_vision(tiny_config(checkpoint=str(tmp_path), resume=True), quiet=True)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch) -> None:
    from metafair_opt.integrations.vision import training

    path = tmp_path / "last.pt"
    training.save_checkpoint({"epoch": 1}, path)

    def broken_save(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(training.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        training.save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left


def test_bfloat16_autocast_keeps_meta_gradients_close_to_float32() -> None:
    """Measured: relative error about 0.02 (bfloat16 keeps 8 bits of mantissa)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    x, y, g = torch.randn(16, 3, 8, 8), torch.randint(0, 2, (16,)), torch.arange(16) % 2

    def meta_gradient(kind: str, amp: bool) -> torch.Tensor:
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        if kind == "align":
            wrapper = GradientAlignmentWrapper(
                model, opt, loss_fn=lambda o, t: F.cross_entropy(o.float(), t), inner_lr=0.1)

            def run():
                wrapper.step(support=(x[g == 1], y[g == 1]), query=(x[g == 0], y[g == 0]))
        else:
            wrapper = SampleReweighter(
                model, opt, num_samples=16, weight_lr=1.0, weight_optimizer="sgd",
                lookahead_lr=0.5,
                loss_fn=lambda o, t, reduction: F.cross_entropy(o.float(), t,
                                                                reduction=reduction))

            def run():
                wrapper.step(x, y, torch.arange(16), val=(x, y, g))
        if amp:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                run()
        else:
            run()
        grads = [p.grad.flatten() for p in model.parameters()]
        assert all(gr.dtype == torch.float32 for gr in grads)
        extra = [] if kind == "align" else [wrapper.weights]
        return torch.cat(grads + extra)

    for kind in ("align", "reweight"):
        exact, mixed = meta_gradient(kind, False), meta_gradient(kind, True)
        error = float((exact - mixed).norm() / exact.norm())
        assert 0 < error < 0.06, (kind, error)


def test_vision_run_with_amp_and_channels_last() -> None:
    from metafair_opt.integrations.vision.training import train_vision

    metrics, model = train_vision(tiny_config(method="faalgrad", amp=True, channels_last=True),
                                  quiet=True)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert set(metrics) >= {"accuracy", "tpr_disparity", "dp_diff", "eo_diff", "max_fnr"}


def test_vision_command_writes_results(tmp_path, capsys) -> None:
    from metafair_opt.cli import main

    status = main(["vision", "--dataset", "colored-digits", "--method", "baseline", "--epochs",
                   "1", "--batch-size", "8", "--max-steps-per-epoch", "2", "--device", "cpu",
                   "--quiet", "--out", str(tmp_path)])
    assert status == 0
    assert (tmp_path / "results.csv").read_text().startswith("dataset,method,seed,accuracy")
    assert main(["vision", "--dataset", "cifar10", "--root", str(tmp_path / "none"),
                 "--out", str(tmp_path)]) == 2
    assert "cifar-10-batches-py" in capsys.readouterr().err
    # The flag reaches the configuration (and is refused for a method without a support set).
    assert main(["vision", "--method", "forml", "--recompute-support", "--epochs", "1",
                 "--batch-size", "8", "--max-steps-per-epoch", "1", "--device", "cpu",
                 "--quiet", "--out", str(tmp_path)]) == 2
    assert "recompute_support applies to FaAlGrad's alignment wrapper only" in (
        capsys.readouterr().err)


def test_amp_dtype_is_float16_on_cuda_and_bfloat16_on_cpu_by_default() -> None:
    from metafair_opt.integrations.vision.training import amp_dtype

    assert amp_dtype(tiny_config(), torch.device("cpu")) is None
    assert amp_dtype(tiny_config(amp=True), torch.device("cpu")) == torch.bfloat16
    assert amp_dtype(tiny_config(amp=True), torch.device("cuda")) == torch.float16
    assert amp_dtype(tiny_config(amp=True, amp_dtype="float16"),
                     torch.device("cpu")) == torch.float16
    with pytest.raises(ValueError, match="amp_dtype must be auto, bfloat16 or float16; got 'fp8'"):
        amp_dtype(tiny_config(amp=True, amp_dtype="fp8"), torch.device("cpu"))


@pytest.mark.parametrize("method", ["baseline", "forml", "faalgrad"])
def test_vision_run_with_float16_and_a_grad_scaler(method: str, tmp_path, monkeypatch) -> None:
    """The CUDA recipe (float16 autocast, GradScaler) run on the CPU, checkpoint included: the
    resumed run goes on from the scale the first one left.

    For FORML this is also the float16 test of the forward-mode weight gradient (ResNet-18 is
    above the "auto" threshold): run in float16, BatchNorm's tangents overflowed on these
    images and every step was skipped; it must run in float32.

    Small images, since float16 convolutions are slow on the CPU (a forward of 256 16x16 images
    took 11.5 s against 0.25 s in bfloat16): at 8x8 the float16 forward-mode pass still skips
    every step (checked by running it in float16; at 12x12 it no longer did). FaAlGrad needs
    12x12: a one-image support set at 8x8 leaves one value per channel for layer4's BatchNorm.
    Eight steps, since the first four overflow at the initial scale (measured: 2**16 backed off
    to 2**12 for all three methods). For the same reason the test split is cut to every eighth
    image (45 of 359, both colours): evaluating all of it took 5-14 s of each run.
    """
    from metafair_opt.integrations.vision import training
    from metafair_opt.integrations.vision.models import build_resnet18

    from metafair_opt.reweighting import FORWARD_MODE_MIN_PARAMETERS

    resnet = build_resnet18(2, small_input=True)
    assert sum(p.numel() for p in resnet.parameters()) >= FORWARD_MODE_MIN_PARAMETERS

    build_datasets = training.build_datasets

    def with_a_smaller_test_split(cfg):
        train, val, test, classes = build_datasets(cfg)
        return train, val, torch.utils.data.Subset(test, range(0, len(test), 8)), classes

    monkeypatch.setattr(training, "build_datasets", with_a_smaller_test_split)
    scales: list[float] = []  # the scale each step was taken at
    update = torch.amp.GradScaler.update

    def recorded_update(scaler, *args, **kwargs):
        scales.append(scaler.get_scale())
        update(scaler, *args, **kwargs)

    monkeypatch.setattr(torch.amp.GradScaler, "update", recorded_update)

    cfg = tiny_config(method=method, amp=True, amp_dtype="float16", checkpoint=str(tmp_path),
                      max_steps_per_epoch=8,
                      extra={"image_size": 12 if method == "faalgrad" else 8})
    _, model = training.train_vision(cfg, quiet=True)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    assert 0 < state["scaler"]["scale"] <= 2.0**16  # GradScaler's initial scale, or backed off
    # The first steps may overflow at the initial scale and be skipped; some must have applied.
    assert state["optimizer"]["state"], "every float16 step was skipped"
    assert len(scales) == 8 and scales[0] == 2.0**16
    scales.clear()
    _, model2 = training.train_vision(replace(cfg, epochs=2, resume=True), quiet=True)
    assert all(torch.isfinite(p).all() for p in model2.parameters())
    assert len(scales) == 8 and scales[0] == state["scaler"]["scale"] < 2.0**16


def test_resume_compares_the_autocast_dtype_the_run_used(tmp_path) -> None:
    from metafair_opt.integrations.vision.training import train_vision

    cfg = tiny_config(method="baseline", amp=True, checkpoint=str(tmp_path))
    train_vision(cfg, quiet=True)  # bfloat16 on the CPU
    path = tmp_path / "last.pt"
    state = torch.load(path, weights_only=False)
    assert state["amp_resolved"] == "torch.bfloat16"
    del state["amp_resolved"], state["config"]["amp_dtype"]  # as written before float16 support
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"'autocast dtype': \('torch.bfloat16', "
                                         r"'torch.float16'\)"):
        train_vision(replace(cfg, epochs=2, resume=True, amp_dtype="float16"), quiet=True)
    train_vision(replace(cfg, epochs=2, resume=True), quiet=True)  # auto: bfloat16 here
    assert torch.load(path, weights_only=False)["epoch"] == 2
