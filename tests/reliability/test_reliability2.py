"""Reliability and fidelity, round 2: one test per fix (16-bit images, empty class folders, source
notes, scaled milestones, paper-form β, ONNX parity with a relative tolerance, wording)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from compressor.config import load_config, scaled_milestones
from compressor.data.folders import load_image_folder, to_rgb
from compressor.data.open import load_digits, open_for_device
from compressor.data.streaming import FolderImages, StreamingData
from compressor.distill.losses import Objective, at_loss, distillation_terms
from compressor.errors import ConfigError, DataError
from tests.helpers import make_image_folder


def _save(img, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


# --- 1. 16-bit PNGs ----------------------------------------------------------------------------


def _sixteen_bit_twins(root: Path, size: int = 8) -> tuple[Path, Path]:
    """Two folders with the same picture: 16-bit grayscale PNGs in one, their 8-bit versions in the other."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("wide", "narrow"):
        for split in ("train", "test"):
            for c in ("a", "b"):
                for i in range(2):
                    v16 = rng.integers(0, 65536, (size, size), dtype=np.uint16) if name == "wide" else None
                    if name == "wide":
                        np.save(root / f"{split}-{c}-{i}.npy", v16)
                        img = Image.fromarray(v16)
                    else:
                        v16 = np.load(root / f"{split}-{c}-{i}.npy")
                        img = Image.fromarray(np.round(v16 / 257).astype(np.uint8))
                    _save(img, root / name / split / c / f"{i}.png")
    return root / "wide", root / "narrow"


def test_sixteen_bit_png_decodes_like_its_8_bit_twin(tmp_path):
    from PIL import Image

    wide, narrow = _sixteen_bit_twins(tmp_path)
    with Image.open(wide / "train" / "a" / "0.png") as im:
        assert im.mode in ("I;16", "I")  # Pillow reads a 16-bit grayscale PNG as one of these
    w, n = load_image_folder(wide), load_image_folder(narrow)
    assert w.train_x.float().mean() > 60  # not clipped to white/black: random values average ~127
    assert (w.train_x.int() - n.train_x.int()).abs().max() <= 1
    assert (w.test_x.int() - n.test_x.int()).abs().max() <= 1
    assert w.notes[0] == "8 16-bit image(s) scaled to 8 bits"
    # the streaming path decodes the same way
    files = sorted(str(p) for p in (wide / "train").rglob("*.png"))
    twins = [f.replace(str(wide), str(narrow)) for f in files]
    for f, t in zip(files, twins):
        a = FolderImages([f], torch.zeros(1, dtype=torch.long), 8).image(0)
        b = FolderImages([t], torch.zeros(1, dtype=torch.long), 8).image(0)
        assert (a.int() - b.int()).abs().max() <= 1


def test_mode_i_is_scaled_by_the_16_bit_range():
    from PIL import Image

    v = np.array([[0, 256, 32896, 65535]], dtype=np.int32)
    rgb = np.asarray(to_rgb(Image.fromarray(v)))  # int32 → mode "I"
    assert Image.fromarray(v).mode == "I"
    assert rgb[0, :, 0].tolist() == [0, 1, 128, 255] and rgb.shape == (1, 4, 3)


# --- 2. empty and differing class folders -------------------------------------------------------


def _folder_with_empty_class(root: Path) -> Path:
    data = make_image_folder(root / "data", classes=2, per_class=3, size=8)
    for split in ("train", "test"):
        (data / split / "cat").mkdir()
    return data


def test_empty_class_folder_is_refused_naming_it(tmp_path):
    data = _folder_with_empty_class(tmp_path)
    msg = f"class folders {data}/train/cat, {data}/test/cat have no images; remove them or add images to them"
    with pytest.raises(DataError) as exc:
        load_image_folder(data, 8)
    assert str(exc.value) == msg
    with pytest.raises(DataError) as exc:  # the streaming path lists the folders the same way
        StreamingData.from_folder(data, 8)
    assert str(exc.value) == msg
    (data / "test" / "cat" / "x.png").write_bytes((data / "test" / "class0" / "0000.png").read_bytes())
    with pytest.raises(DataError, match=f"^class folder {data}/train/cat has no images; remove it or add images to it$"):
        load_image_folder(data, 8)


def test_hidden_folders_are_not_classes(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=2, per_class=3, size=8)
    (data / "train" / ".ipynb_checkpoints").mkdir()
    assert load_image_folder(data, 8).class_names == ["class0", "class1"]


def test_different_class_folders_are_named(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=3, per_class=3, size=8)
    (data / "test" / "class2").rename(data / "test" / "dog")
    expected = f"{data}: train/ and test/ have different class folders (only in train/: class2; only in test/: dog); make them the same"
    for load in (lambda: load_image_folder(data, 8), lambda: StreamingData.from_folder(data, 8)):
        with pytest.raises(DataError) as exc:
            load()
        assert str(exc.value) == expected


@pytest.mark.slow
def test_empty_class_and_class_mismatch_through_the_cli(tmp_path):
    from tests.helpers import assert_error, run_atc

    data = _folder_with_empty_class(tmp_path)
    r = run_atc("train", "--arch", "wrn-10-1", "--data", str(data), "--preset", "demo", "--out", str(tmp_path / "t.pt"))
    assert_error(r, f"class folders {data}/train/cat, {data}/test/cat have no images; remove them or add images to them",
                 only_line=False)
    (data / "train" / "cat").rmdir()
    (data / "test" / "cat" / "0.png").write_bytes((data / "test" / "class0" / "0000.png").read_bytes())
    r = run_atc("train", "--arch", "wrn-10-1", "--data", str(data), "--preset", "demo", "--out", str(tmp_path / "t.pt"))
    assert_error(r, f"{data}: train/ and test/ have different class folders (only in test/: cat); make them the same",
                 only_line=False)
    assert not (tmp_path / "t.pt").exists()


# --- 3. what was done to the source images --------------------------------------------------------


def test_grayscale_resized_folder_records_channels_and_size(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("a", "b"):
            for i in range(2):
                _save(Image.fromarray(rng.integers(0, 256, (6, 10), dtype=np.uint8)), tmp_path / "g" / split / c / f"{i}.png")
    data = load_image_folder(tmp_path / "g", 16)
    assert data.input_size == (3, 16, 16)
    assert (data.source_channels, data.resized_images, data.resized_from) == ((1,), 8, (6, 10))
    assert data.notes == ["1-channel (grayscale) images converted to RGB by repeating the channel",
                          "8 of 8 images resized from 6x10 to 16x16 (bilinear)"]
    assert data.subset(train=2).notes == data.notes  # a subset keeps them
    again = load_image_folder(tmp_path / "g", 16)  # from the decode cache
    assert again.notes == data.notes and again.source_channels == (1,)
    streamed = StreamingData.from_folder(tmp_path / "g", 16)
    assert streamed.source_channels == (1,) and streamed.resized_from == (6, 10) and streamed.notes == data.notes
    kept = open_for_device(tmp_path / "g", 16, torch.device("cpu"))
    assert kept.notes == data.notes


def test_rgb_folder_of_the_right_size_has_no_notes(tmp_path):
    data = load_image_folder(make_image_folder(tmp_path / "rgb", classes=2, per_class=3, size=8), 8)
    assert (data.source_channels, data.resized_images, data.resized_from, data.notes) == ((3,), 0, None, [])


def test_digits_say_they_were_grayscale_and_upscaled():
    pytest.importorskip("sklearn")
    d = load_digits(16)
    assert d.source_channels == (1,) and d.resized_from == (8, 8)
    assert d.notes == ["1-channel (grayscale) images converted to RGB by repeating the channel",
                       "1,797 of 1,797 images resized from 8x8 to 16x16 (bilinear)"]


# --- 4. scaled milestones ------------------------------------------------------------------------


@pytest.mark.parametrize("epochs,expected", [(3, [1, 2]), (2, [1]), (1, []), (15, [4, 9, 12]), (200, [60, 120, 160]),
                                             (400, [120, 240, 320])])
def test_scaled_milestones_are_strictly_increasing_and_inside_the_run(epochs, expected):
    assert scaled_milestones([60, 120, 160], 200, epochs) == expected


def test_epochs_override_never_stacks_two_lr_drops():
    for epochs in range(1, 30):
        ms = list(load_config("cifar", [f"train.epochs={epochs}"]).train.milestones)
        assert ms == sorted(set(ms)) and all(1 <= m < epochs for m in ms), (epochs, ms)
    assert load_config("cifar", ["train.epochs=3"]).train.milestones == (1, 2)
    assert load_config("cifar", ["train.epochs=3", "train.milestones=2,2"]).train.milestones == (2, 2)  # the user's own: kept


# --- 6. paper-form β -----------------------------------------------------------------------------


def test_paper_form_at_term_is_of_the_code_forms_order_with_the_default_beta():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(128, 16, 32, 32, generator=g), torch.randn(128, 16, 32, 32, generator=g)
    logits, y = torch.zeros(128, 10), torch.zeros(128, dtype=torch.long)
    beta = load_config("cifar").distill.beta
    code = float(distillation_terms(Objective("at", beta=beta, form="code"), logits, y, pairs=[(s, t)])["at"])
    paper = float(distillation_terms(Objective("at", beta=beta, form="paper"), logits, y, pairs=[(s, t)])["at"])
    assert 0.1 < paper / code < 10, (paper, code)
    # the paper's rule: 10³ / (H·W) on the batch-mean distance, i.e. 10³/(H·W·B) on the batch sum
    sums = 0.5 * (torch.nn.functional.normalize(s.pow(2).mean(1).flatten(1), dim=1)
                  - torch.nn.functional.normalize(t.pow(2).mean(1).flatten(1), dim=1)).norm(dim=1).sum()
    assert paper == pytest.approx(float(1000 / (32 * 32 * 128) * sums), rel=1e-4)
    # before: β = 1000 on the unscaled paper distance was hundreds of times the code form's term
    assert float(1000 * at_loss(s, t, form="paper")) / code > 100


def test_paper_form_pairs_are_weighted_by_their_own_map_size():
    g = torch.Generator().manual_seed(1)
    s8, t8 = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 5, 16, 16, generator=g)  # pooled to 8×8
    terms = distillation_terms(Objective("at", beta=1000.0, form="paper"), torch.zeros(4, 2), torch.zeros(4, dtype=torch.long),
                               pairs=[(s8, t8)])
    assert float(terms["at"]) == pytest.approx(1000 / 64 * float(at_loss(s8, t8, form="paper")), rel=1e-6)


# --- 8. ONNX parity with a relative tolerance -----------------------------------------------------


def _big_logits_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10))
    with torch.no_grad():
        m[1].weight.mul_(50)
        m[1].bias.fill_(400.0)
    return m.eval()


def test_compare_is_allclose_and_reports_both_errors():
    from compressor.export.onnx import Parity, compare

    ref = np.array([[400.0, -2.0, 0.0]])
    assert compare(ref + np.array([[1.6e-4, 0, 0]]), ref, 1e-4, 1e-4) == pytest.approx((1.6e-4, 4e-7, True))
    assert compare(ref + np.array([[0, 0, 2e-4]]), ref, 1e-4, 1e-4)[2] is False  # a logit near 0 stays held to atol
    assert compare(ref, ref, 1e-4, 1e-4) == (0.0, 0.0, True)
    assert compare(ref * np.nan, ref, 1e-4, 1e-4)[2] is False
    p = Parity({1: 0.5, 8: 2.0}, 1e-4, {1: 1e-3, 8: 5e-3}, 1e-4, {1: False, 8: False})
    assert not p.ok and p.worst == 2.0 and p.worst_rel == 5e-3
    assert p.failure() == ("ONNX parity check failed at batch 8: max |onnxruntime - torch| = 2.00e+00 (relative 5.00e-03), "
                           "over atol 0.0001 + rtol 0.0001 x |torch|; inspect the model or relax --atol")
    assert Parity({1: 1e-5}, 1e-4).ok  # made the old way (no elementwise result): the absolute check


def test_onnx_parity_passes_large_logits_and_fails_a_wrong_model(tmp_path):
    pytest.importorskip("onnxruntime")
    from compressor.export.onnx import check_parity, to_onnx

    model = _big_logits_model(0)
    with torch.no_grad():
        assert model(torch.randn(8, 3, 4, 4)).abs().max() > 300
    path = to_onnx(model, (3, 4, 4), tmp_path / "m.onnx")
    good = check_parity(model, path, (3, 4, 4))
    assert good.ok and set(good.max_abs_diff) == set(good.max_rel_diff) == {1, 8}
    assert good.worst_rel < 1e-5 and good.rtol == good.atol == 1e-4
    assert check_parity(model, path, (3, 4, 4), atol=0).rtol == 0  # --atol 0 still means identical outputs
    wrong = check_parity(_big_logits_model(1), path, (3, 4, 4))
    assert not wrong.ok and wrong.worst > 1 and wrong.worst_rel > 1e-3
    assert wrong.failure().startswith("ONNX parity check failed at batch ")


# --- 10. wording ---------------------------------------------------------------------------------


@pytest.mark.parametrize("override,message", [
    ("train.epochs=abc", "train.epochs must be an integer, got 'abc'"),
    ("train.seed=1.5", "train.seed must be an integer, got '1.5'"),
    ("data.flip=maybe", "data.flip must be true or false, got 'maybe'"),
    ("train.lr=abc", "train.lr must be a float, got 'abc'"),  # unchanged (docs/reliability.md)
])
def test_option_type_messages_read_well(override, message):
    with pytest.raises(ConfigError) as exc:
        load_config("cifar", [override])
    assert str(exc.value) == message
