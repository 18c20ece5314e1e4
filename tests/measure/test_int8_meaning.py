"""INT8 that means the same everywhere (issue 25): 7-bit weights on x86 CPUs without VNNI, and the
top-1 agreement of onnxruntime's INT8 run with the QDQ graph (onnx's reference evaluator)."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from compressor.export import int8
from compressor.export.int8 import Agreement, Int8Result, Int8Weights, cpu_flags, int8_weights, qdq_agreement, quantize_int8
from compressor.export.onnx import to_onnx
from compressor.models.registry import create_model

AVX2_ONLY = {"fpu", "sse2", "avx", "avx2", "fma"}


def test_x86_without_vnni_gets_7_bit_weights_and_says_why():
    w = int8_weights(AVX2_ONLY, machine="x86_64")
    assert w.reduce_range and "no VNNI" in w.why and w.label == "S8 7-bit (reduce_range)"


@pytest.mark.parametrize("flag", ["avx512_vnni", "avx_vnni"])
def test_vnni_keeps_8_bit_weights(flag):
    w = int8_weights(AVX2_ONLY | {flag}, machine="AMD64")
    assert not w.reduce_range and flag in w.why and w.label == "S8 8-bit"


def test_unreadable_flags_are_treated_as_no_vnni_and_other_cpus_keep_8_bits():
    assert int8_weights(None, machine="x86_64").reduce_range
    assert not int8_weights(None, machine="aarch64").reduce_range


def test_cpu_flags_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512_vnni\n\nprocessor\t: 1\n")
    assert cpu_flags(info) == {"fpu", "avx2", "avx512_vnni"}
    assert cpu_flags(tmp_path / "absent") is None


def test_the_detected_choice_follows_the_flags(monkeypatch):
    monkeypatch.setattr(int8, "cpu_flags", lambda path="/proc/cpuinfo": set(AVX2_ONLY))
    assert int8_weights(machine="x86_64").reduce_range
    monkeypatch.setattr(int8, "cpu_flags", lambda path="/proc/cpuinfo": AVX2_ONLY | {"avx512_vnni"})
    assert not int8_weights(machine="x86_64").reduce_range


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("int8")
    path = to_onnx(create_model("wrn-10-1", num_classes=3).eval(), (3, 16, 16), d / "m.onnx")
    calib = np.random.default_rng(0).standard_normal((32, 3, 16, 16)).astype(np.float32)
    return path, calib


def _weight_range(path):
    model = onnx.load(str(path))
    ints = [numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and t.dims]
    return min(int(a.min()) for a in ints), max(int(a.max()) for a in ints)


def test_reduce_range_quantizes_weights_to_7_bits(fp32_onnx, tmp_path):
    path, calib = fp32_onnx
    lo8, hi8 = _weight_range(quantize_int8(path, tmp_path / "full.onnx", calib))
    lo7, hi7 = _weight_range(quantize_int8(path, tmp_path / "reduced.onnx", calib, reduce_range=True))
    assert max(-lo8, hi8) > 64  # the full range is used
    assert -64 <= lo7 and hi7 <= 64


def test_agreement_counts_images_spread_over_the_set_within_the_budget(fp32_onnx, tmp_path):
    path, calib = fp32_onnx
    q = quantize_int8(path, tmp_path / "q.onnx", calib)
    x = np.random.default_rng(1).standard_normal((40, 3, 16, 16)).astype(np.float32)
    a = qdq_agreement(q, x, threads=1, max_images=40, budget_s=60)
    assert a.images == 40 and 0 <= a.agree <= 40
    one_batch = qdq_agreement(q, x, threads=1, budget_s=0, batch=8)
    assert one_batch.images == 8  # a spent budget still measures one batch


def test_agreement_notes_say_when_the_cpu_computes_something_else():
    r = Int8Result("s.int8.onnx", 99.0, 90.0, 1.5, (1.4, 1.6), 1.0, 0.7, 256, Int8Weights(False, "8-bit weights: VNNI"),
                   Agreement(1784, 2004, 3.0))
    notes = r.notes()
    assert notes[0] == "8-bit weights: VNNI"
    assert "differs from the QDQ graph's on 220 of 2004" in notes[1] and "this CPU's" in notes[1]
    r.agreement = Agreement(64, 64, 1.0)
    assert len(r.notes()) == 1
    d = r.to_dict()
    assert d["weights"]["reduce_range"] is False and d["agreement"] == {"agree": 64, "images": 64, "seconds": 1.0}
