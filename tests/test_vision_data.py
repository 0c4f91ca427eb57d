"""metafair_opt.integrations.vision: CIFAR/CelebA through torchvision on fixtures written in
torchvision's on-disk formats, the coloured digits, and the ResNet-18 builder. CPU only, offline.

The fixtures bypass exactly one thing: torchvision's MD5 comparison
(``torchvision.datasets.utils.check_md5``), which real files pass and hand-written ones cannot.
Everything else (file-existence checks, unpickling, CSV parsing, image decoding, transforms) is
torchvision's own code.
"""

from __future__ import annotations

import io
import math
import pickle
import socket
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

torchvision = pytest.importorskip("torchvision")
pytest.importorskip("timm")

from metafair_opt.integrations.vision import (  # noqa: E402
    CIFAR_STATS,
    GroupedDataset,
    build_resnet18,
    celeba,
    cifar,
    colored_digits,
)
from torchvision.datasets import CIFAR10, CelebA  # noqa: E402

from metafair_opt import (  # noqa: E402
    ByGroup,
    GradientAlignmentWrapper,
    GroupBalancedBatchSampler,
    SampleReweighter,
)

#: The 40 attribute names of list_attr_celeba.txt, in the file's order.
CELEBA_ATTRS = [
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows",
    "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup",
    "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard",
    "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks", "Sideburns",
    "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick",
    "Wearing_Necklace", "Wearing_Necktie", "Young",
]


# ------------------------------------------------------------------------------ fixtures
class _Py2Pickler(pickle._Pickler):
    """Writes ``bytes`` as Python 2 ``str`` (BINSTRING), as in the real CIFAR pickles.

    The official files were pickled by Python 2, so their keys (``b"data"``, ``b"labels"``) are
    Python 2 strings; torchvision unpickles them with ``encoding="latin1"`` and reads
    ``entry["data"]``. A plain Python 3 pickle of ``bytes`` keys would not load.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _write_py2_pickle(path: Path, obj: dict) -> None:
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(obj)
    path.write_bytes(buffer.getvalue())


def _cifar_batch(rng: np.random.Generator, labels: list[int], key: bytes) -> dict:
    data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
    names = [f"img_{i}.png".encode() for i in range(len(labels))]
    return {b"batch_label": b"fixture", key: labels, b"data": data, b"filenames": names}


def write_cifar10(root: Path) -> dict[str, np.ndarray]:
    """5 training batches of 6 images (3 per class) and a test batch of 6, CIFAR-10 format."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_x, train_y = [], []
    for b in range(5):
        batch = _cifar_batch(rng, [(6 * b + i) % 10 for i in range(6)], b"labels")
        _write_py2_pickle(folder / f"data_batch_{b + 1}", batch)
        train_x.append(batch[b"data"])
        train_y += batch[b"labels"]
    test = _cifar_batch(rng, [9, 8, 7, 0, 1, 2], b"labels")
    _write_py2_pickle(folder / "test_batch", test)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
             b"ship", b"truck"]
    _write_py2_pickle(folder / "batches.meta",
                      {b"num_cases_per_batch": 6, b"label_names": names, b"num_vis": 3072})
    return {"train_x": np.vstack(train_x), "train_y": np.array(train_y),
            "test_x": test[b"data"], "test_y": np.array(test[b"labels"])}


def write_cifar100(root: Path) -> dict[str, np.ndarray]:
    """200 training images (2 per class) and 10 test images, CIFAR-100 format."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    train = _cifar_batch(rng, [i % 100 for i in range(200)], b"fine_labels")
    train[b"coarse_labels"] = [i % 20 for i in range(200)]
    test = _cifar_batch(rng, list(range(0, 100, 10)), b"fine_labels")
    test[b"coarse_labels"] = [i % 20 for i in range(10)]
    _write_py2_pickle(folder / "train", train)
    _write_py2_pickle(folder / "test", test)
    _write_py2_pickle(folder / "meta", {
        b"fine_label_names": [f"fine_{i}".encode() for i in range(100)],
        b"coarse_label_names": [f"coarse_{i}".encode() for i in range(20)],
    })
    return {"train_y": np.array(train[b"fine_labels"]), "test_y": np.array(test[b"fine_labels"])}


def write_celeba(root: Path) -> dict[str, np.ndarray]:
    """12 solid-colour 178x218 JPEGs and the five annotation files, in CelebA's text formats."""
    from PIL import Image

    folder = root / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    rng = np.random.default_rng(2)
    n = 12
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    partition = np.array([0, 0, 1, 0, 2, 0, 0, 1, 2, 0, 1, 2])
    attr = rng.choice([-1, 1], size=(n, 40))
    colours = rng.integers(20, 236, size=(n, 3))
    for name, colour in zip(names, colours):
        image = Image.new("RGB", (178, 218), tuple(int(c) for c in colour))
        image.save(folder / "img_align_celeba" / name, quality=95)
    lines = [str(n), " ".join(CELEBA_ATTRS) + " "]  # the real header line ends with a space
    lines += [name + "".join(f" {v:2d}" for v in row) for name, row in zip(names, attr)]
    (folder / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (folder / "list_eval_partition.txt").write_text(
        "".join(f"{name} {p}\n" for name, p in zip(names, partition)))
    (folder / "identity_CelebA.txt").write_text(
        "".join(f"{name} {1000 + i}\n" for i, name in enumerate(names)))
    bbox = [str(n), "image_id x_1 y_1 width height"]
    bbox += [f"{name}    {95 + i:3d}  71 226 313" for i, name in enumerate(names)]
    (folder / "list_bbox_celeba.txt").write_text("\n".join(bbox) + "\n")
    marks = [str(n), "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x "
             "leftmouth_y rightmouth_x rightmouth_y"]
    marks += [f"{name} 69  109  106  113   77  142   73  152  108  154" for name in names]
    (folder / "list_landmarks_align_celeba.txt").write_text("\n".join(marks) + "\n")
    return {"partition": partition, "attr": (attr + 1) // 2, "colours": colours}


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """Any download attempt fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    for cls in (CIFAR10, CelebA):
        monkeypatch.setattr(cls, "download", refuse)


@pytest.fixture
def skip_md5(monkeypatch):
    """Bypass only torchvision's MD5 comparison; its file-existence checks still run."""
    monkeypatch.setattr(torchvision.datasets.utils, "check_md5", lambda *args, **kwargs: True)


@pytest.fixture
def cifar10_root(tmp_path):
    return tmp_path, write_cifar10(tmp_path)


@pytest.fixture
def celeba_root(tmp_path):
    return tmp_path, write_celeba(tmp_path)


def _normalised(rows: np.ndarray, name: str) -> torch.Tensor:
    mean, std = (torch.tensor(v)[:, None, None] for v in CIFAR_STATS[name])
    return (torch.from_numpy(rows).float().reshape(-1, 3, 32, 32) / 255 - mean) / std


# --------------------------------------------------------------------------------- CIFAR
def test_cifar10_items_targets_and_groups(cifar10_root, skip_md5):
    root, raw = cifar10_root
    test = cifar(root, split="test")
    assert isinstance(test, GroupedDataset) and len(test) == 6
    assert test.targets.dtype == test.groups.dtype == torch.long
    assert test.targets.tolist() == raw["test_y"].tolist()
    assert torch.equal(test.groups, test.targets)
    for i in range(len(test)):
        x, y, group, index = test[i]
        assert x.dtype == torch.float32 and x.shape == (3, 32, 32)
        assert type(y) is int and type(group) is int and index == i
        assert y == group == raw["test_y"][i]
        torch.testing.assert_close(x, _normalised(raw["test_x"][i], "cifar10")[0])

    x, y, group, index = next(iter(DataLoader(test, batch_size=4)))
    assert x.shape == (4, 3, 32, 32)
    assert y.dtype == group.dtype == index.dtype == torch.long
    assert index.tolist() == [0, 1, 2, 3]


def test_cifar10_val_is_balanced_seeded_and_disjoint(cifar10_root, skip_md5):
    root, raw = cifar10_root
    val = cifar(root, split="val", val_size=10, seed=3)
    train = cifar(root, split="train", val_size=10, seed=3, augment=False)
    assert (len(val), len(train)) == (10, 20)
    assert torch.bincount(val.targets, minlength=10).tolist() == [1] * 10
    assert torch.bincount(train.targets, minlength=10).tolist() == [2] * 10
    assert set(val.indices.tolist()).isdisjoint(train.indices.tolist())
    assert sorted(val.indices.tolist() + train.indices.tolist()) == list(range(30))
    for split in (val, train):
        assert split.targets.tolist() == raw["train_y"][split.indices.numpy()].tolist()
        assert torch.equal(split.groups, split.targets)
    expected = _normalised(raw["train_x"][val.indices.numpy()], "cifar10")
    torch.testing.assert_close(torch.stack([val[i][0] for i in range(len(val))]), expected)
    x, y, group, index = train[5]
    torch.testing.assert_close(x, _normalised(raw["train_x"][int(train.indices[5])], "cifar10")[0])
    assert (y, group, index) == (int(train.targets[5]), int(train.targets[5]), 5)

    assert torch.equal(cifar(root, split="val", val_size=10, seed=3).indices, val.indices)
    assert not torch.equal(cifar(root, split="val", val_size=10, seed=4).indices, val.indices)
    assert len(cifar(root, split="val", val_size=20)) == 20


def test_cifar10_augmentation_only_on_train(cifar10_root, skip_md5):
    root, _ = cifar10_root
    train = cifar(root, split="train", val_size=10)
    kinds = [type(t).__name__ for t in train.base.transform.transforms]
    assert kinds == ["RandomCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert train[0][0].shape == (3, 32, 32)
    for split in ("val", "test"):
        base = cifar(root, split=split, val_size=10).base
        assert [type(t).__name__ for t in base.transform.transforms] == ["ToTensor", "Normalize"]


def test_cifar10_val_size_errors(cifar10_root, skip_md5):
    root, _ = cifar10_root
    with pytest.raises(ValueError, match="not divisible by the 10 classes"):
        cifar(root, split="val", val_size=15)
    with pytest.raises(ValueError, match="too large"):
        cifar(root, split="train", val_size=30)
    with pytest.raises(ValueError, match="split must be"):
        cifar(root, split="valid")
    with pytest.raises(ValueError, match="name must be one of"):
        cifar(root, name="cifar11")


def test_cifar100_fine_labels(tmp_path, skip_md5):
    raw = write_cifar100(tmp_path)
    test = cifar(tmp_path, name="cifar100", split="test")
    assert test.targets.tolist() == raw["test_y"].tolist()
    assert torch.equal(test.groups, test.targets)
    val = cifar(tmp_path, name="cifar100", split="val", val_size=100)
    train = cifar(tmp_path, name="cifar100", split="train", val_size=100)
    assert torch.bincount(val.targets, minlength=100).tolist() == [1] * 100
    assert len(train) == 100 and set(val.indices.tolist()).isdisjoint(train.indices.tolist())
    x, y, group, _ = train[0]
    assert x.shape == (3, 32, 32) and y == group == raw["train_y"][int(train.indices[0])]
    kinds = [type(t).__name__ for t in train.base.transform.transforms]
    assert kinds[:2] == ["RandomCrop", "RandomHorizontalFlip"]
    assert train.base.transform.transforms[-1].mean == CIFAR_STATS["cifar100"][0]
    with pytest.raises(ValueError, match="not divisible by the 100 classes"):
        cifar(tmp_path, name="cifar100", split="val", val_size=50)


def test_cifar_missing_data_messages(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        cifar(tmp_path, split="train")
    message = str(info.value)
    assert message.startswith(f"CIFAR-10 not found under {tmp_path}: missing ")
    for fragment in ("<root>/cifar-10-batches-py/data_batch_1", "<root>/cifar-10-batches-py/"
                     "data_batch_5", "<root>/cifar-10-batches-py/test_batch",
                     "<root>/cifar-10-batches-py/batches.meta",
                     "https://www.cs.toronto.edu/~kriz/cifar.html", "nothing is downloaded"):
        assert fragment in message

    with pytest.raises(FileNotFoundError) as info:
        cifar(tmp_path, name="cifar100", split="test")
    message = str(info.value)
    for fragment in ("<root>/cifar-100-python/train", "<root>/cifar-100-python/test",
                     "<root>/cifar-100-python/meta", "https://www.cs.toronto.edu/~kriz/cifar.html",
                     "nothing is downloaded"):
        assert fragment in message

    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing cifar-10-batches-py/data_batch_3\."):
        cifar(tmp_path, split="test")


def test_checksum_failures_are_reported(tmp_path):
    write_cifar10(tmp_path)  # no skip_md5: hand-written files fail torchvision's MD5 check
    write_celeba(tmp_path)
    with pytest.raises(RuntimeError, match="CIFAR-10 files were found but torchvision's integ"):
        cifar(tmp_path, split="test")
    with pytest.raises(RuntimeError, match="CelebA files were found but torchvision's integr"):
        celeba(tmp_path)


# -------------------------------------------------------------------------------- CelebA
def test_celeba_items_follow_the_attributes(celeba_root, skip_md5):
    root, raw = celeba_root
    target, sensitive = CELEBA_ATTRS.index("Attractive"), CELEBA_ATTRS.index("Male")
    for split, code in (("train", 0), ("valid", 1), ("test", 2)):
        rows = np.flatnonzero(raw["partition"] == code)
        data = celeba(root, split=split, image_size=32)
        assert len(data) == rows.size
        assert data.targets.tolist() == raw["attr"][rows, target].tolist()
        assert data.groups.tolist() == raw["attr"][rows, sensitive].tolist()
        assert set(data.groups.tolist()) <= {0, 1}
        for i, row in enumerate(rows):
            x, y, group, index = data[i]
            assert x.dtype == torch.float32 and x.shape == (3, 32, 32)
            assert type(y) is int and type(group) is int and index == i
            assert (y, group) == (raw["attr"][row, target], raw["attr"][row, sensitive])
            # solid-colour JPEGs: Normalize(0.5, 0.5) maps the colour c to c / 127.5 - 1
            expected = torch.tensor(raw["colours"][row] / 127.5 - 1, dtype=torch.float32)
            torch.testing.assert_close(x.mean(dim=(1, 2)), expected, atol=0.04, rtol=0)

    other = celeba(root, target="Young", sensitive="Pale_Skin", split="val", image_size=16)
    rows = np.flatnonzero(raw["partition"] == 1)
    assert other.targets.tolist() == raw["attr"][rows, CELEBA_ATTRS.index("Young")].tolist()
    assert other.groups.tolist() == raw["attr"][rows, CELEBA_ATTRS.index("Pale_Skin")].tolist()
    assert other[0][0].shape == (3, 16, 16)


def test_celeba_default_size_and_transforms(celeba_root, skip_md5):
    root, _ = celeba_root
    data = celeba(root, split="test")
    assert data[0][0].shape == (3, 128, 128)
    kinds = [type(t).__name__ for t in data.base.transform.transforms]
    assert kinds == ["CenterCrop", "Resize", "ToTensor", "Normalize"]
    assert list(data.base.transform.transforms[0].size) == [178, 178]


def test_celeba_attribute_errors(celeba_root, skip_md5):
    root, _ = celeba_root
    with pytest.raises(ValueError) as info:
        celeba(root, target="Handsome")
    message = str(info.value)
    assert "target='Handsome' is not a CelebA attribute" in message
    assert "5_o_Clock_Shadow" in message and "Wearing_Necktie, Young." in message
    with pytest.raises(ValueError, match="sensitive='Gender' is not a CelebA attribute"):
        celeba(root, sensitive="Gender")
    with pytest.raises(ValueError, match="choose two attributes"):
        celeba(root, target="Male", sensitive="Male")
    with pytest.raises(ValueError, match="split must be"):
        celeba(root, split="all")


def test_celeba_missing_data_messages(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        celeba(tmp_path)
    message = str(info.value)
    for fragment in ("<root>/celeba/img_align_celeba/*.jpg", "<root>/celeba/list_attr_celeba.txt",
                     "<root>/celeba/list_eval_partition.txt", "<root>/celeba/identity_CelebA.txt",
                     "<root>/celeba/list_bbox_celeba.txt",
                     "<root>/celeba/list_landmarks_align_celeba.txt",
                     "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html", "nothing is downloaded"):
        assert fragment in message

    write_celeba(tmp_path)
    (tmp_path / "celeba" / "identity_CelebA.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing identity_CelebA\.txt in"):
        celeba(tmp_path)


# ------------------------------------------------------------------------ coloured digits
def test_colored_digits_statistics():
    bias = 0.9
    splits = {name: colored_digits(name, bias=bias, seed=0) for name in ("train", "val", "test")}
    assert sum(len(d) for d in splits.values()) == 1797
    totals = sum(torch.bincount(d.digits, minlength=10) for d in splits.values())
    for name, share in (("train", 0.6), ("val", 0.2), ("test", 0.2)):
        counts = torch.bincount(splits[name].digits, minlength=10)
        assert (counts - share * totals).abs().max() <= 1  # stratified by digit

    for name, data in splits.items():
        p = bias if name == "train" else 0.5
        agreement = (data.groups == data.targets).double().mean().item()
        tolerance = 4 * math.sqrt(p * (1 - p) / len(data))  # 4 binomial standard errors
        assert abs(agreement - p) <= tolerance, (name, agreement)
        assert torch.equal(data.targets, data.digits % 2)
        assert set(data.groups.tolist()) == {0, 1}

    low = colored_digits("train", bias=0.6, seed=0)
    agreement = (low.groups == low.targets).double().mean().item()
    assert abs(agreement - 0.6) <= 4 * math.sqrt(0.24 / len(low))


def test_colored_digits_items_colours_and_normalisation():
    data = colored_digits("test", image_size=32, seed=0)
    x, y, group, index = data[7]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32)
    assert type(y) is int and type(group) is int and index == 7
    images = torch.stack([data[i][0] for i in range(len(data))])
    # the two colours share the channel statistics, so channel 0 (red) >= channel 1 (green)
    # exactly where the colour is red (group 0), with equality on the black background
    red = data.groups == 0
    assert (images[red, 0] >= images[red, 1] - 1e-6).all()
    assert (images[~red, 1] >= images[~red, 0] - 1e-6).all()
    assert (images[:, 0] - images[:, 1]).abs().amax(dim=(1, 2)).min() > 1.0
    assert images.mean(dim=(0, 2, 3)).abs().max() < 0.1
    assert (images.std(dim=(0, 2, 3)) - 1).abs().max() < 0.1
    assert colored_digits("val", image_size=12)[0][0].shape == (3, 12, 12)


def test_colored_digits_is_seeded():
    a, b = colored_digits("train", seed=5), colored_digits("train", seed=5)
    assert torch.equal(a.base.tensors[0], b.base.tensors[0])
    assert torch.equal(a.groups, b.groups) and torch.equal(a.targets, b.targets)
    c = colored_digits("train", seed=6)
    assert not torch.equal(a.groups, c.groups) or not torch.equal(a.digits, c.digits)
    with pytest.raises(ValueError, match="bias must lie in"):
        colored_digits(bias=1.5)
    with pytest.raises(ValueError, match="split must be"):
        colored_digits("valid")


def test_vision_items_feed_the_meta_optimisers():
    train, val = colored_digits("train", image_size=8), colored_digits("val", image_size=8)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    reweighter = SampleReweighter(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                  num_samples=len(train), loss_fn=F.cross_entropy)
    x, y, _, idx = next(iter(DataLoader(train, batch_size=32, shuffle=True)))
    sampler = GroupBalancedBatchSampler(val.groups, batch_size=32, seed=0)
    xv, yv, gv, _ = next(iter(DataLoader(val, batch_sampler=sampler)))
    reweighter.zero_grad()
    result = reweighter.step(x, y, idx, val=(xv, yv, gv))
    assert math.isfinite(float(result.meta_loss))

    aligner = GradientAlignmentWrapper(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                       loss_fn=F.cross_entropy, inner_lr=0.1)
    x, y, group, _ = next(iter(DataLoader(train, batch_size=32)))
    aligner.zero_grad()
    assert not aligner.step_batch(x, y, group, split=ByGroup(support_group=1)).fallback


# ------------------------------------------------------------------------------- models
def test_resnet18_small_input_forward_backward():
    torch.manual_seed(0)
    model = build_resnet18(num_classes=7)
    conv = model.conv1
    assert (conv.kernel_size, conv.stride, conv.padding) == ((3, 3), (1, 1), (1, 1))
    assert (conv.in_channels, conv.out_channels, conv.bias) == (3, 64, None)
    assert isinstance(model.maxpool, nn.Identity)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    F.cross_entropy(out, torch.tensor([0, 6])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_resnet18_imagenet_stem():
    model = build_resnet18(num_classes=3, small_input=False)
    assert (model.conv1.kernel_size, model.conv1.stride) == ((7, 7), (2, 2))
    assert isinstance(model.maxpool, nn.MaxPool2d)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    with pytest.raises(ValueError, match="num_classes"):
        build_resnet18(num_classes=0)


@pytest.fixture
def offline_empty_cache(tmp_path, monkeypatch):
    """No network (socket connections fail) and empty Hugging Face and torch hub caches."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    return tmp_path


def test_resnet18_pretrained_needs_the_local_cache(offline_empty_cache):
    with pytest.raises(RuntimeError) as info:
        build_resnet18(num_classes=10, pretrained=True)
    message = str(info.value)
    assert "pretrained ResNet-18 weights are not in the local cache (~/.cache/huggingface/hub)" in (
        message
    )
    assert "download them once with network access or pass pretrained=False" in message
    assert str(offline_empty_cache / "hf" / "hub") in message


def test_resnet18_pretrained_loads_from_the_cache(offline_empty_cache):
    import timm
    from safetensors.torch import save_file

    source = timm.create_model("resnet18", pretrained=False)
    repo = offline_empty_cache / "hf" / "hub" / "models--timm--resnet18.a1_in1k"
    revision = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "snapshots" / revision).mkdir(parents=True)
    save_file(source.state_dict(), str(repo / "snapshots" / revision / "model.safetensors"))

    full = build_resnet18(num_classes=1000, small_input=False, pretrained=True)
    for name, tensor in source.state_dict().items():
        assert torch.equal(full.state_dict()[name], tensor), name
    cifar_net = build_resnet18(num_classes=10, pretrained=True)
    assert torch.equal(cifar_net.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    assert cifar_net.fc.out_features == 10 and cifar_net.conv1.kernel_size == (3, 3)
