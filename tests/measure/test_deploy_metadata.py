"""The ONNX metadata says how to feed the model: the README's deployment recipe, which resizes with the
filter named in ``atc.resize``, gives exactly the pixels atc itself decoded and evaluated."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from compressor.data.open import open_dataset
from compressor.export.onnx import metadata_for
from compressor.models.spec import ModelSpec


def test_metadata_names_the_resize_filter_and_it_reproduces_atcs_pixels(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (45, 37, 3), dtype=np.uint8)).save(tmp_path / split / c / "0.png")
    data = open_dataset(tmp_path, image_size=32)
    spec = ModelSpec.for_arch("resnet8x1", 2, input_size=(3, 32, 32), mean=[0.5] * 3, std=[0.25] * 3)
    meta = metadata_for(spec)
    assert meta["atc.resize"] == "BILINEAR" and json.loads(meta["atc.mean"]) == [0.5] * 3
    resample = Image.Resampling[meta["atc.resize"]]  # as the README's snippet does
    c, h, w = json.loads(meta["atc.input_size"])
    ours = np.asarray(Image.open(tmp_path / "test" / "a" / "0.png").convert("RGB").resize((w, h), resample)).transpose(2, 0, 1)
    assert np.array_equal(ours, data.test_x[0].numpy())
    default = np.asarray(Image.open(tmp_path / "test" / "a" / "0.png").convert("RGB").resize((w, h))).transpose(2, 0, 1)
    assert not np.array_equal(default, data.test_x[0].numpy())  # PIL's default filter is another one
    assert torch.equal(torch.from_numpy(ours.copy()), data.test_x[0])
