"""Issue 21, points 7, 8 and 11 (the parts in presets, seeds, messages and the decode cache):
inputs that gave a traceback, a wrong explanation or a silently wrong dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from compressor import fileio
from compressor.config import load_config, parse_overrides
from compressor.data import folders
from compressor.data.images import batch_seed
from compressor.data.open import open_dataset
from compressor.errors import ConfigError, shown
from tests.helpers import assert_error, make_image_folder

# --- point 8: seeds ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_unix_timestamp_seed_trains(atc, tmp_path):
    data = make_image_folder(tmp_path / "d", per_class=4)
    out = tmp_path / "t.pt"
    r = atc("train", "--arch", "wrn-10-1", "--data", str(data), "--preset", "demo", "--epochs", "1", "--seed", "1700000000",
            "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert out.exists() and "Overflow" not in r.stderr


def test_a_seed_beyond_64_bits_is_refused_before_anything_is_written(atc, tmp_path):
    data = make_image_folder(tmp_path / "d", per_class=4)
    r = atc("train", "--arch", "wrn-10-1", "--data", str(data), "--preset", "demo", "--seed", str(1 << 64),
            "--out", str(tmp_path / "t.pt"))
    assert_error(r, f"train.seed must be at most {(1 << 64) - 1}, got {1 << 64}", only_line=False)
    assert not (tmp_path / "t.pt").exists() and not (tmp_path / "t.pt.state").exists()


def test_batch_seeds_fit_a_generator_and_keep_the_old_values():
    assert batch_seed(3, 2, 5) == (3 * 1_000_003 + 2) * 1_000_003 + 5  # unchanged where it fitted
    big = batch_seed((1 << 64) - 1, 199, 10_000)
    assert 0 <= big < (1 << 64)
    torch.Generator().manual_seed(big)  # no overflow
    assert batch_seed(1_700_000_000, 1, 0) != batch_seed(1_700_000_000, 1, 1)


# --- point 11: user text in messages ----------------------------------------------------------


@pytest.mark.parametrize("item, message", [
    ("\n", r"override '\n' must look like section.key=value, e.g. train.epochs=10"),
    ("train.epochs=3\nx", r"train.epochs must be an integer, got '3\nx'"),
    ("bogus\t.x=1", "override: unknown section 'bogus\\t'; valid sections are data, train, distill, student"),
    ("train.l\nr=1", r"override: unknown key 'train.l\nr'; valid keys are"),
])
def test_user_text_with_control_characters_stays_on_one_line(item, message):
    with pytest.raises(ConfigError) as exc:
        load_config("cifar", parse_overrides([item]))
    assert "\n" not in str(exc.value) and "\t" not in str(exc.value)
    assert message in str(exc.value)


def test_a_set_item_with_a_newline_is_one_line_at_the_cli(atc):
    r = atc("train", "--arch", "wrn-10-1", "--data", "digits", "--out", "/nonexistent/t.pt", "--set", "train.ep\nochs=2")
    line = assert_error(r, r"unknown key 'train.ep\nochs'", only_line=False)
    assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1, line


def test_shown_keeps_plain_text_and_escapes_the_rest():
    assert shown("runs/a b.pt") == "runs/a b.pt"
    assert shown("a\nb") == "'a\\nb'"


# --- point 7 and 13: presets ------------------------------------------------------------------


def test_a_preset_with_a_byte_order_mark_loads(tmp_path):
    (tmp_path / "bom.toml").write_bytes(b"\xef\xbb\xbf[train]\nepochs = 3\n")
    assert load_config(tmp_path / "bom.toml").train.epochs == 3


@pytest.mark.parametrize("text, message", [
    ("[[train]]\nepochs = 3\n", "preset p: [[train]] is an array of tables; write [train] (one table) instead"),
    ("[description]\nx = 1\n", "preset p: description is a line of text, not a section with keys"),
    ("[train]\nmilestones = [60.5, 120]\n", "train.milestones must be a comma list of whole numbers, e.g. "
                                            "train.milestones=60,120,160, got [60.5, 120]"),
    ("train = 3\n", "preset p: train must be a table ([train] with key = value lines), got 3"),
    ("[model]\nname = 'x'\n", "preset p: unknown section 'model'; valid sections are data, train, distill, student"),
])
def test_preset_oddities_get_the_right_explanation(tmp_path, text, message):
    (tmp_path / "p.toml").write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "p.toml")
    assert str(exc.value).startswith(message)


def test_a_folder_given_as_preset_is_named_a_folder(atc, tmp_path):
    (tmp_path / "presets").mkdir()
    r = atc("train", "--arch", "wrn-10-1", "--data", "digits", "--out", str(tmp_path / "t.pt"), "--preset", str(tmp_path / "presets"))
    assert_error(r, f"preset {tmp_path / 'presets'} is a folder; pass a preset file (.toml) or a shipped preset", only_line=False)


def test_a_shipped_preset_name_is_the_shipped_preset_beside_a_folder_of_that_name(tmp_path, monkeypatch):
    # `atc demo --out demo` creates ./demo before it reads the demo preset
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()
    (tmp_path / "cifar").write_text("not toml [")
    assert load_config("demo").preset == "demo" and load_config("cifar").preset == "cifar"
    with pytest.raises(ConfigError, match=r"preset demo is a folder"):
        load_config(Path("demo"))  # a path is a path
    with pytest.raises(ConfigError, match=r"preset \./demo is a folder|preset demo is a folder"):
        load_config("./demo")


def test_unknown_sections_in_overrides_are_refused_not_dropped():
    with pytest.raises(ConfigError, match="override: description is a line of text"):
        load_config("cifar", ["description.note=hello"])
    with pytest.raises(ConfigError, match="unknown section 'report'"):
        load_config("cifar", ["report.x=1"])


# --- point 7: the decode cache and EXIF orientation -------------------------------------------


def _cache_files() -> list[Path]:
    return sorted(folders.cache_dir().glob("*.pt"))


def test_a_cache_whose_tensors_disagree_with_its_header_is_decoded_again(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=5)
    for f in _cache_files():
        f.unlink()
    first = open_dataset(root)
    caches = _cache_files()
    assert len(caches) == 2
    for cache in caches:  # labels shorter than images: a cache that lies
        blob = torch.load(cache, weights_only=True)
        blob["y"] = blob["y"][:-2]
        fileio.torch_save(cache, blob)
    again = open_dataset(root)
    assert torch.equal(again.train_y, first.train_y) and torch.equal(again.train_x, first.train_x)
    assert len(again.train_y) == len(again.train_x) == 15
    for cache in _cache_files():  # and rewritten whole
        blob = torch.load(cache, weights_only=True)
        assert len(blob["y"]) == len(blob["x"]) in (15, 6)


def test_cache_fits_checks_each_field():
    x = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    good = {"x": x, "y": torch.tensor([0, 1, 2, 0]), "skipped": ["bad.png"], "info": folders.new_source_info()}
    assert folders.cache_fits(good, 5, 3)
    assert not folders.cache_fits(good, 4, 3)  # the folder has other files now
    assert not folders.cache_fits({**good, "y": torch.tensor([0, 1, 2, 3])}, 5, 3)  # a label beyond the classes
    assert not folders.cache_fits({**good, "x": x.float()}, 5, 3)
    assert not folders.cache_fits({**good, "skipped": "bad.png"}, 5, 3)
    assert not folders.cache_fits({**good, "info": {}}, 5, 3)
    assert not folders.cache_fits([1, 2], 5, 3)


def test_exif_rotated_photos_are_turned_upright_with_a_note(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=3, size=16)
    photo = root / "train" / "class0" / "photo.jpg"
    pixels = np.zeros((16, 24, 3), np.uint8)  # 16 high, 24 wide, a bright left edge
    pixels[:, :4] = 255
    exif = Image.Exif()
    exif[folders.EXIF_ORIENTATION] = 6  # "rotate 90° clockwise to view"
    Image.fromarray(pixels).save(photo, exif=exif, quality=95)
    data = open_dataset(root, image_size=16)
    assert any("1 photo(s) turned upright by their EXIF orientation" in n for n in data.notes)
    turned, rotated = folders.upright(Image.open(photo))
    assert rotated and turned.size == (16, 24)  # now 24 high, 16 wide
    top = np.asarray(turned.convert("RGB"))[:4].mean()  # the bright edge is now at the top
    assert top > 200


# --- points 10 and 13: the training state read back ------------------------------------------


@pytest.fixture
def stopped_run(atc, tmp_path):
    """A 1-epoch run of 2 epochs' schedule, its state kept as if killed after epoch 1."""
    data = make_image_folder(tmp_path / "d", per_class=4)
    out = tmp_path / "t.pt"
    args = ["train", "--arch", "wrn-10-1", "--data", str(data), "--preset", "demo", "--epochs", "2", "--out", str(out)]
    prelude = ("import compressor.distill.state as s\n"
               "orig = s.TrainingState.epoch_done\n"
               "def once(self, record, seconds):\n"
               "    orig(self, record, seconds)\n"
               "    raise SystemExit(9)\n"
               "s.TrainingState.epoch_done = once\n")
    r = atc(*args, prelude=prelude)
    assert r.returncode == 9, r.stderr
    state = tmp_path / "t.pt.state" / "train_state.pt"
    assert state.exists() and not out.exists()
    return args, state


def test_a_truncated_training_state_says_how_to_start_again_and_that_works(atc, stopped_run):
    args, state = stopped_run
    state.write_bytes(state.read_bytes()[:3000])
    r = atc(*args, "--resume")
    assert_error(r, f"the training state {state} is unreadable or truncated", only_line=False)
    assert "pass --overwrite instead of --resume to start this run again" in r.stderr
    r = atc(*args, "--overwrite")  # the advice works: no "pass --resume" loop
    assert r.returncode == 0, r.stderr


def test_a_training_state_without_its_optimizer_is_named(atc, stopped_run):
    args, state = stopped_run
    blob = torch.load(state, weights_only=True)
    del blob["optimizer"]
    fileio.torch_save(state, blob)
    assert_error(atc(*args, "--resume"), f"the training state {state}: field 'optimizer' is missing; pass --overwrite", only_line=False)
    blob["optimizer"], blob["epoch"] = {"state": {}, "param_groups": []}, "one"
    fileio.torch_save(state, blob)
    assert_error(atc(*args, "--resume"), "field 'epoch' must be a whole number, got str", only_line=False)


def test_a_training_state_of_another_architecture_is_one_line(atc, stopped_run):
    args, state = stopped_run
    other = [a if a != "wrn-10-1" else "wrn-16-1" for a in args]
    r = atc(*other, "--resume")
    line = assert_error(r, f"the training state in {state.parent} was made with student=wrn-10-1 (now wrn-16-1)", only_line=False)
    assert "pass --overwrite to start again" in line
