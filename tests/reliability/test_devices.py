"""Device discipline without a GPU: every helper that makes a tensor or runs a forward outside the
training batches takes its device from the model it serves, and export and timing never move the
caller's model.

The trick: put the teacher (and student) on PyTorch's ``meta`` device. A CPU tensor that meets
meta weights in BatchNorm or Linear raises "Tensor on device meta is not on the expected device
cpu!", the way a CPU tensor meets a teacher on CUDA. (Conv2d alone does not check: a meta conv on
a CPU input quietly returns a CPU tensor, so these tests use whole networks, which all have
BatchNorm or Linear layers.) Helpers that need real values (export, weight ranking, timing) must
refuse a meta model with atc's one-line ``AtcError``, never a device-mismatch traceback.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from compressor.config import load_config
from compressor.data.images import ImageData
from compressor.device import cpu_copy, example_input, model_device
from compressor.errors import AtcError
from compressor.models.registry import parse_arch

SIZE = (3, 16, 16)
MISMATCH = re.compile(r"expected device|same device|Expected all tensors", re.I)
NO_VALUES = re.compile(r"on meta tensors|copy out of meta")  # meta's own limit: reading numbers out


def _chain(exc: BaseException | None):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def no_device_mismatch(fn, *args, **kwargs):
    """Run ``fn``; it may succeed or raise an AtcError, but no error anywhere in its chain may be about devices."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        bad = [e for e in _chain(exc) if MISMATCH.search(str(e))]
        assert not bad, f"{fn.__name__} met a tensor on another device: {type(bad[0]).__name__}: {bad[0]}"
        assert isinstance(exc, AtcError), f"{fn.__name__} raised {type(exc).__name__} ({exc}), not atc's one-line AtcError"
        return exc


def stops_only_for_values(fn, *args, **kwargs):
    """Run ``fn`` on meta models; it may stop only where numbers are read out (``float``, ``.cpu()``)."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        chain = list(_chain(exc))
        bad = [e for e in chain if MISMATCH.search(str(e))]
        assert not bad, f"{getattr(fn, '__name__', fn)} met a tensor on another device: {type(bad[0]).__name__}: {bad[0]}"
        assert any(NO_VALUES.search(str(e)) for e in chain), f"unexpected {type(exc).__name__}: {exc}"
        return None


def meta(arch: str) -> nn.Module:
    return parse_arch(arch).build(3).to("meta")


def test_meta_catches_a_cpu_tensor_like_cuda_does():
    """The premise: BatchNorm/Linear on meta refuse a CPU input (Conv2d alone does not: it checks nothing)."""
    with pytest.raises(RuntimeError, match="expected device"):
        meta("wrn-10-1")(torch.zeros(1, *SIZE))
    out = nn.Conv2d(3, 4, 3).to("meta")(torch.zeros(1, 3, 8, 8))
    assert out.device.type == "cpu"  # why the tests below use whole networks, not a lone convolution


def test_example_input_follows_the_model():
    t = meta("wrn-10-1")
    assert example_input(t, SIZE).device.type == "meta"
    assert example_input(nn.ReLU(), SIZE).device.type == "cpu"  # no parameters: the CPU


# ------------------------------------------------------------------ pairing and thinning traces


def test_pairing_on_meta_models():
    from compressor.pair import find_pairs, find_stages

    t, s = meta("wrn-16-2"), meta("wrn-10-1")
    stages = find_stages(t, example_input(t, SIZE))
    assert [st.module for st in stages] == ["group0", "group1", "group2"]
    pairs = find_pairs(s, t, torch.zeros(1, *SIZE))  # a CPU example follows each model to its device
    assert [(p.student.shape[0], p.teacher.shape[0]) for p in pairs] == [(16, 32), (32, 64), (64, 128)]


def test_thinning_traces_follow_the_model():
    from compressor.derive.thinning import block_stages, check_traceable, classifier_name, describe_stages

    t, s = meta("wrn-16-2"), meta("wrn-10-1")
    check_traceable(t, SIZE)
    assert [b.name for b in block_stages(t, SIZE)] == ["group0", "group1", "group2"]
    assert classifier_name(t, SIZE) == "fc"
    rows = describe_stages(t, s, SIZE)
    assert [(r.blocks, r.teacher_blocks, r.width, r.teacher_width) for r in rows] == [(1, 2, 16, 32), (1, 2, 32, 64), (1, 2, 64, 128)]


@pytest.mark.slow
def test_describe_stages_with_teacher_and_student_on_different_devices():
    """The dry run after a --by latency search: the thinner's teacher is elsewhere, the new student on the CPU."""
    from compressor.derive.thinning import Thinner

    thinner = Thinner(parse_arch("wrn-16-2").build(3), SIZE)
    thinner.teacher.to("meta")  # as if the teacher had gone to CUDA after the Thinner was built
    student, plan = no_device_mismatch(thinner.student, 0.5)
    assert model_device(student).type == "cpu"
    assert [r.teacher_width for r in plan.stages] == [32, 64, 128]
    assert [r.width for r in plan.stages] == [16, 32, 64]


def test_thinning_a_meta_teacher_is_a_one_line_error():
    from compressor.derive.candidates import derived_ladder
    from compressor.derive.thinning import inherit, thin
    from compressor.models.spec import ModelSpec

    t = meta("wrn-16-2")
    err = no_device_mismatch(thin, t, SIZE, 0.5)
    assert isinstance(err, AtcError) and "meta" in str(err)
    spec = ModelSpec.for_arch("wrn-16-2", 3)
    assert isinstance(no_device_mismatch(derived_ladder, spec, t), AtcError)
    assert isinstance(no_device_mismatch(inherit, t, {"kept": {}, "removed_blocks": []}), AtcError)
    assert model_device(t).type == "meta"


# ------------------------------------------------------------------ the dry run


def _data(n: int = 8) -> ImageData:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, *SIZE), dtype=torch.uint8, generator=g)
    y = torch.arange(n) % 3
    return ImageData("toy", x, y, x.clone(), y.clone(), ["a", "b", "c"])


def test_dry_run_plan_on_a_meta_teacher():
    """The dry run builds each student on the teacher's device and pairs on the teacher's device; the
    loss terms need values (``float``), which meta cannot give, and that is all that may fail."""
    from compressor import dryrun
    from compressor.derive.candidates import StudentChoice, choose_students
    from compressor.models.spec import ModelSpec

    cfg = load_config("demo")
    t_spec = ModelSpec.for_arch("wrn-16-2", 3)
    t_spec = type(t_spec)(**{**t_spec.__dict__, "input_size": SIZE, "mean": [0.5] * 3, "std": [0.25] * 3})
    teacher = meta("wrn-16-2")
    cands = choose_students(t_spec, cfg, StudentChoice(names=["wrn-10-1"]))
    seen = {}
    real_terms = dryrun.initial_terms

    def terms(student, teacher, pairs, data, cfg, mean, std, method, *hint):  # hint: FitNet's pair and regressor
        seen["devices"] = {model_device(student).type, model_device(teacher).type}
        seen["pairs"] = [p.describe() for p in pairs]
        return stops_only_for_values(real_terms, student, teacher, pairs, data, cfg, mean, std, method, *hint) or {}

    dryrun.initial_terms, saved = terms, dryrun.initial_terms
    try:
        runs = dryrun.try_students(teacher, t_spec, _data(), cfg, cands, "at+kd")
    finally:
        dryrun.initial_terms = saved
    assert seen["devices"] == {"meta"}
    assert len(seen["pairs"]) == 3 and len(runs) == 1 and len(runs[0].stages) == 3


def test_initial_terms_batch_follows_the_teacher():
    """The dry run's batch is made on the teacher's device: no device error (meta then stops at ``float``)."""
    from compressor.dryrun import initial_terms
    from compressor.pair import find_pairs

    cfg = load_config("demo")
    t, s = meta("wrn-16-2"), meta("wrn-10-1")
    pairs = find_pairs(s, t, example_input(t, SIZE))
    stops_only_for_values(initial_terms, s, t, pairs, _data(), cfg, [0.5] * 3, [0.25] * 3, "at+kd")


# ------------------------------------------------------------------ attention studies


def test_attention_maps_follow_the_model():
    from compressor.studies.attention import Net, analyze, attention_stages, stage_activations

    t, s = Net("t", meta("wrn-16-2"), [0.5] * 3, [0.25] * 3), Net("s", meta("wrn-10-1"), [0.5] * 3, [0.25] * 3)
    x, y = _data().test_x[:2], _data().test_y[:2]
    acts, logits = stage_activations(t, x, y, ["group1", "group2"], gradient=False)
    assert logits.device.type == "meta" and [a.shape[1] for a in acts] == [64, 128]
    stages = attention_stages(t, s, t.prepare(x[:1], model_device(t.model)), "all", False)
    assert [st[1] for st in stages] == ["group0", "group1", "group2"]
    stops_only_for_values(analyze, t, s, x, y)  # the default device is the teacher's
    assert model_device(t.model).type == "meta" and model_device(s.model).type == "meta"


# ------------------------------------------------------------------ export, counting and timing keep the model where it is


class _Watched(nn.Module):
    """A small CNN that records every device or dtype move of itself (not of copies)."""

    moves: list[int] = []

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(4, 3))

    def forward(self, x):
        return self.body(x)

    def _apply(self, fn, recurse=True):
        _Watched.moves.append(id(self))
        return super()._apply(fn, recurse)


def test_export_and_timing_work_on_copies(tmp_path):
    from compressor.export.onnx import check_parity, to_onnx
    from compressor.profiling.latency import Timing, measure_latency

    model = _Watched().train()
    _Watched.moves.clear()
    path = to_onnx(model, SIZE, tmp_path / "m.onnx")
    assert check_parity(model, path, SIZE, batch_sizes=(1,)).ok
    measure_latency(model, SIZE, "torch-cpu", 1, 1, Timing(warmup=0, min_runs=1, min_time_s=0))
    assert id(model) not in _Watched.moves  # copies moved, the caller's model did not
    assert model.training  # and it is still in train mode


def test_export_count_and_time_a_meta_model():
    from compressor.export.onnx import to_onnx
    from compressor.profiling.counts import count_macs
    from compressor.profiling.latency import Timing, measure_latency

    t = meta("wrn-10-1")
    for fn, args in ((to_onnx, (t, SIZE, "unused.onnx")), (measure_latency, (t, SIZE, "torch-cpu", 1, 1, Timing(0, 1, 0))),
                     (cpu_copy, (t,))):
        err = no_device_mismatch(fn, *args)
        assert isinstance(err, AtcError) and "meta" in str(err)
    no_device_mismatch(count_macs, t, SIZE)  # fvcore traces on the model's device (or says it cannot)
    assert model_device(t).type == "meta"


def test_input_fit_check_on_the_models_device():
    from compressor.models.checkpoint import _fits

    ok, why = _fits(meta("wrn-10-1"), SIZE)
    assert ok, why


# ------------------------------------------------------------------ GPU latency in reports, without a GPU


def _fake_measure(model, input_size, runtime, batch_size, threads=None, timing=None, onnx_path=None, fmt=None):
    from compressor.profiling.latency import Latency

    ms = 0.5 + 0.01 * batch_size
    return Latency(runtime, batch_size, threads or 1, ms, ms, ms, ms, 0.0, 20, batch_size / (ms / 1e3), ["cuda:0"])


def test_gpu_figures_without_cuda_leave_a_note_only():
    from compressor.measure import gpu_figures

    entries, meta_ = gpu_figures([("t", _Watched(), None)], SIZE, cuda=False)
    assert entries == [] and "gpu" not in meta_
    assert len(meta_["gpu_notes"]) == 1 and "no CUDA device" in meta_["gpu_notes"][0]


def test_gpu_figures_assemble_entries_with_a_fake_timer():
    from compressor.measure import gpu_figures

    models = [("teacher", _Watched(), None), ("student", _Watched(), None)]
    entries, meta_ = gpu_figures(models, SIZE, cuda=True, ort_cuda=False, measure=_fake_measure, device_name="Fake GPU")
    torch_runs = [("torch-cuda", 1), ("torch-cuda", 256), ("torch-cuda-graph", 1), ("torch-cuda-graph", 256)]
    assert [[(r["runtime"], r["batch_size"]) for r in e["runs"]] for e in entries] == [torch_runs] * 2
    assert entries[0]["device"] == "Fake GPU" and entries[0]["runs"][1]["median_ms"] == pytest.approx(3.06)
    assert meta_["gpu"]["runtimes"] == ["torch-cuda", "torch-cuda-graph"] and meta_["gpu"]["batch_sizes"] == [1, 256]
    assert any("CUDAExecutionProvider" in n for n in meta_["gpu_notes"])  # why onnxruntime's CUDA is missing
    entries, meta_ = gpu_figures(models, SIZE, cuda=True, ort_cuda=True, measure=_fake_measure, device_name="Fake GPU")
    assert [r["runtime"] for r in entries[1]["runs"]] == ["torch-cuda"] * 2 + ["torch-cuda-graph"] * 2 + ["ort-cuda"] * 2
    assert meta_["gpu_notes"] == []


def _report(gpu_entries, gpu_meta):
    from compressor.entries import StudentEntry, TeacherEntry
    from compressor.report.build import Report

    t_gpu, s_gpu = (gpu_entries or [None, None])
    student = StudentEntry(name="s", method="at+kd", params=10, gmacs=0.001, gflops=0.002, top1=90.0, top1_delta=-1.0,
                           param_ratio=2.0, mac_ratio=2.0, latency_ms=0.1, latency_speedup=2.0, latency_speedup_spread=[1.9, 2.1],
                           latency_speedup_quartiles=[1.95, 2.05], checkpoint="s.pt", onnx="s.onnx",
                           onnx_parity_max_abs_diff={"1": 0.0}, onnx_parity_max_rel_diff={"1": 0.0}, train_seconds=1.0, epochs=1,
                           attention_pairs=[], init=None, gpu_latency=s_gpu)
    return Report("atc compress", "demo", "at+kd", 1, {}, {"name": "toy", "train": 8, "test": 8, "classes": 3},
                  {"runtime": "ort-cpu", "batch_size": 1, "threads": 1, "rounds": 15, "teacher_median_ms": 0.2,
                   "teacher_cv": 0.01, **gpu_meta}, TeacherEntry("t", 20, 0.002, 0.004, 91.0, 0.2, t_gpu), [student],
                  environment={})


def test_report_without_cuda_has_cpu_keys_and_a_note():
    from compressor.measure import gpu_figures
    from compressor.report.tables import markdown

    d = _report(*gpu_figures([("t", _Watched(), None), ("s", _Watched(), None)], SIZE, cuda=False)).to_dict()
    assert "gpu_latency" not in d["teacher"] and "gpu_latency" not in d["students"][0]
    assert d["teacher"]["latency_ms"] == 0.2 and d["students"][0]["latency_speedup"] == 2.0  # CPU figures where they were
    md = markdown(d)
    assert "## GPU latency" not in md and "no CUDA device" in md


def test_report_with_fake_gpu_timings_shows_them():
    from compressor.measure import gpu_figures
    from compressor.report.tables import gpu_rows, markdown

    d = _report(*gpu_figures([("t", _Watched(), None), ("s", _Watched(), None)], SIZE, cuda=True, ort_cuda=False,
                             measure=_fake_measure, device_name="Fake GPU")).to_dict()
    assert d["teacher"]["gpu_latency"]["runs"][0]["runtime"] == "torch-cuda"
    assert [r[:4] for r in gpu_rows(d)] == [[m, role, rt, bs] for m, role in (("t", "teacher"), ("s", "student"))
                                            for rt in ("torch-cuda", "torch-cuda-graph") for bs in ("1", "256")]
    md = markdown(d)
    assert "## GPU latency" in md and "Fake GPU" in md and "CUDAExecutionProvider" in md


def test_profile_gpu_section(monkeypatch):
    from compressor.profiling import summary

    model = _Watched()
    p = summary.profile_model(model, "m", SIZE, runtimes=(), gpu=False)
    assert "gpu_latency" not in p.to_dict() and "no CUDA device" in p.gpu_notes[0]
    p = summary.profile_model(model, "m", SIZE, runtimes=(), gpu=True, ort_cuda=False, measure=_fake_measure, device_name="Fake GPU")
    d = p.to_dict()
    assert [(r["runtime"], r["batch_size"]) for r in d["gpu_latency"]["runs"]] == [
        ("torch-cuda", 1), ("torch-cuda", 256), ("torch-cuda-graph", 1), ("torch-cuda-graph", 256)]
    assert any("onnxruntime-gpu" in n for n in p.gpu_notes)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # detection, not injection
    assert summary.profile_model(model, "m", SIZE, runtimes=()).gpu_latency is None


# ------------------------------------------------------------------ data-parallel helpers on one process


def test_distributed_helpers_without_a_group():
    from compressor import distributed

    distributed.barrier()  # no process group: nothing to wait for
    assert distributed.all_reduce_sum([1.0, 2.0], torch.device("meta")) == [1.0, 2.0]
    m = nn.Linear(2, 2)
    assert distributed.wrap_student(m, torch.device("cpu")) is m
