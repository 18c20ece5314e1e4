"""GPU latency as a deployer sees it, tested without a GPU: the PyTorch runtimes at the trained precision
and memory format, the CUDA-graph replay (through the fake of torch.cuda in tests/fake_cuda.py), each
labelled; onnxruntime's CUDA provider only when a one-op model truly runs on it; and every failure of
a GPU timing a note, never an exception."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compressor.models import create_model
from compressor.profiling import latency
from compressor.profiling.latency import GpuFormat, Latency, Runner, Timing, gpu_latency, gpu_status, measure_latency
from tests import fake_cuda

SIZE = (3, 16, 16)
CPU = torch.device("cpu")
QUICK = Timing(warmup=1, min_runs=3, min_time_s=0.0)


def _model():
    torch.manual_seed(0)
    return create_model("wrn-10-0.5", 3).eval()


def test_the_graph_runtime_replays_the_model_at_the_trained_precision_and_format(monkeypatch):
    cuda = fake_cuda.install(monkeypatch)
    model = _model()
    fmt = GpuFormat.of_run(torch.bfloat16, True)
    runner = Runner(model, SIZE, "torch-cuda-graph", 4, 1, fmt=fmt, device=CPU)
    assert len(cuda.captures) == 1 and cuda.current is cuda.default
    assert runner.x.is_contiguous(memory_format=torch.channels_last) and next(runner.model.parameters()) is not next(model.parameters())
    runner.x.copy_(torch.randn(4, *SIZE))
    seconds = runner()
    assert seconds >= 0 and cuda.replays == 1
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = runner.model(runner.x)
    assert runner.out.dtype == torch.bfloat16 and torch.equal(runner.out, expected)  # the replay did the forward, in bf16
    lat = measure_latency(model, SIZE, "torch-cuda-graph", 4, 1, QUICK, fmt=fmt, device=CPU)
    assert (lat.precision, lat.memory_format, lat.label) == ("bf16", "channels_last", "CUDA graph replay, launch-free")
    assert lat.runs >= 3 and lat.batch_size == 4 and len(cuda.captures) == 2


def test_the_eager_runtime_is_labelled_with_its_format_and_leaves_the_callers_model_alone(monkeypatch):
    fake_cuda.install(monkeypatch)
    model = _model()
    lat = measure_latency(model, SIZE, "torch-cuda", 1, 1, QUICK, fmt=GpuFormat("fp32", False), device=CPU)
    assert (lat.runtime, lat.precision, lat.memory_format, lat.label) == ("torch-cuda", "fp32", "contiguous",
                                                                          "eager forward, launches included")
    assert not model.training and next(model.parameters()).is_contiguous()
    assert measure_latency(model, SIZE, "torch-cpu", 1, 1, QUICK).precision == "fp32"  # CPU figures as before


def _fake(model, input_size, runtime, batch_size, threads=None, timing=None, onnx_path=None, fmt=GpuFormat()):
    if runtime == "torch-cuda-graph":
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")
    if runtime == "ort-cuda" and batch_size > 1:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    return Latency(runtime, batch_size, 1, 1.0, 1.0, 1.0, 1.0, 0.0, 3, batch_size * 1e3, ["cuda:0"], fmt.precision,
                   fmt.memory_format, latency.LABELS[runtime])


def test_a_gpu_timing_that_fails_is_a_note_and_the_others_stay():
    g = gpu_latency(_model(), SIZE, None, (1, 64), QUICK, runtimes=["torch-cuda", "torch-cuda-graph", "ort-cuda"],
                    measure=_fake, device_name="Fake GPU", fmt=GpuFormat("bf16", True))
    assert [(r.runtime, r.batch_size, r.precision) for r in g.runs] == [("torch-cuda", 1, "bf16"), ("torch-cuda", 64, "bf16"),
                                                                       ("ort-cuda", 1, "bf16")]
    assert g.notes == ["torch-cuda-graph at batch 1: not timed (RuntimeError: CUDA error: operation not permitted when "
                       "stream is capturing)",
                       "torch-cuda-graph at batch 64: not timed (RuntimeError: CUDA error: operation not permitted when "
                       "stream is capturing)",
                       "ort-cuda at batch 64: out of GPU memory, not timed"]


class _FakeOrt:
    """onnxruntime as onnxruntime-gpu can be: ``mode`` = missing (no CUDA provider listed), fallback (listed,
    but sessions end up on the CPU), broken (listed, session creation fails), works (runs, on the real
    CPU build underneath, reporting CUDA)."""

    def __init__(self, mode: str):
        import onnxruntime as real

        self.real, self.mode, self.SessionOptions = real, mode, real.SessionOptions

    def get_available_providers(self):
        return ["CPUExecutionProvider"] + ([] if self.mode == "missing" else ["CUDAExecutionProvider"])

    def InferenceSession(self, model, opts=None, providers=None):  # noqa: N802 - onnxruntime's name
        if self.mode == "broken":
            raise RuntimeError("Failed to load library libonnxruntime_providers_cuda.so with error: libcudnn.so.9: cannot "
                               "open shared object file\nsecond line")
        session = self.real.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        reported = ["CPUExecutionProvider"] if self.mode == "fallback" else ["CUDAExecutionProvider", "CPUExecutionProvider"]
        session.get_providers = lambda: reported
        return session


@pytest.mark.parametrize("mode, ok, note", [
    ("missing", False, "onnxruntime has no CUDAExecutionProvider here"),
    ("fallback", False, "lists CUDAExecutionProvider but a session fell back to CPUExecutionProvider"),
    ("broken", False, "a one-op model does not run on it (RuntimeError: Failed to load library "
                      "libonnxruntime_providers_cuda.so"),
    ("works", True, ""),
])
def test_onnxruntime_cuda_counts_only_when_a_one_op_model_runs_on_it(monkeypatch, mode, ok, note):
    monkeypatch.setattr(latency, "onnxruntime", lambda: _FakeOrt(mode))
    monkeypatch.setattr(latency, "_ORT_CUDA", [])
    status = latency.ort_cuda_status()
    assert status[0] is ok and note in status[1] and "\n" not in status[1]
    runtimes, notes = gpu_status(cuda=True)
    assert runtimes == ["torch-cuda", "torch-cuda-graph"] + (["ort-cuda"] if ok else [])
    assert notes == ([] if ok else [status[1]])
    assert latency.ort_cuda_status() is status  # checked once per process


def test_the_probe_model_is_a_valid_one_op_model():
    import onnxruntime as ort
    from onnx import checker

    captured = {}

    class Keep(_FakeOrt):
        def InferenceSession(self, model, opts=None, providers=None):  # noqa: N802
            captured["model"] = model
            return super().InferenceSession(model, opts, providers)

    assert latency._one_op_on_cuda(Keep("works")) == (True, "")
    import onnx

    checker.check_model(onnx.load_from_string(captured["model"]))
    out = ort.InferenceSession(captured["model"], providers=["CPUExecutionProvider"]).run(None, {"x": -np.ones((1, 4), np.float32)})
    assert out[0].tolist() == [[0.0] * 4]


def test_gpu_figures_time_every_model_in_the_trained_format_and_say_so():
    from compressor.measure import gpu_figures
    from compressor.report.tables import GPU_COLUMNS, gpu_lines, gpu_rows

    models = [("t", _model(), None), ("s", _model(), None)]
    entries, meta = gpu_figures(models, SIZE, cuda=True, ort_cuda=False, measure=_fake, device_name="Fake GPU",
                                fmt=GpuFormat("bf16", True))
    runs = [(r["runtime"], r["precision"], r["memory_format"]) for r in entries[1]["runs"]]
    assert runs == [("torch-cuda", "bf16", "channels_last")] * 2  # the graph runtime failed: a note, not an error
    assert (meta["gpu"]["precision"], meta["gpu"]["memory_format"]) == ("bf16", "channels_last")
    assert any(n.startswith("torch-cuda-graph at batch 1: not timed (RuntimeError") for n in meta["gpu_notes"])
    report = {"teacher": {"name": "t", "gpu_latency": entries[0]}, "students": [{"name": "s", "gpu_latency": entries[1]}],
              "latency": meta}
    assert gpu_rows(report)[0][6:] == ["bf16, channels_last", "eager forward, launches included"]
    lines = gpu_lines(report)
    assert "| " + " | ".join(GPU_COLUMNS) + " |" in lines and any("torch-cuda-graph at batch 1: not timed" in n for n in lines)
