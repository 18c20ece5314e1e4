"""``--help`` as the manual and one word per meaning (issue 25): grouped options with their defaults,
two examples per command, one thread default, ``--dry-run --json``, ``profile`` of an ONNX file,
a missing file named as such, the preset from the data, ``--student-checkpoint`` in attention."""

import json

import pytest

from compressor.export.onnx import export_checked
from compressor.models.checkpoint import load_model
from tests.helpers import assert_error

COMMANDS = ["train", "compress", "derive", "profile", "export", "report", "demo", "attention", "sweep", "models", "inspect"]


def test_compress_help_groups_its_options_and_shows_defaults(atc):
    r = atc("compress", "--help")
    assert r.returncode == 0
    text = r.stdout
    heads = [line[:-1] for line in text.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert heads == ["Input", "Student", "Distillation", "Training", "Speed", "Output", "Options"]  # --help alone ungrouped
    section = text.split("\nTraining:\n", 1)[1].split("\n\n", 1)[0]
    assert "--epochs" in section and "[default: (the preset's: cifar 200" in " ".join(section.split())
    output = " ".join(text.split("\nOutput:\n", 1)[1].split("\n\n", 1)[0].split())
    assert "--threads" in output and "[default: 1;" in output and "--pick" in output and "--keep-state" in output


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_two_examples(atc, command):
    r = atc(command, "--help")
    assert r.returncode == 0, r.stderr
    examples = r.stdout.split("Examples:", 1)[1].strip().splitlines()
    assert len(examples) == 2 and all(line.strip().startswith(f"atc {command}") for line in examples), examples


def test_one_thread_default_everywhere(atc):
    for command in ("compress", "demo", "profile", "export"):
        help_text = " ".join(atc(command, "--help").stdout.split())
        assert "--threads <int range>" in help_text and "[default: 1;" in help_text.split("--threads", 1)[1][:400], command


def test_dry_run_json_goes_to_stdout(atc, tiny_teacher, tiny_folder):
    r = atc("compress", "--teacher", str(tiny_teacher()), "--data", str(tiny_folder), "--preset", "demo", "--student", "wrn-10-0.5",
            "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    s = plan["students"][0]
    assert plan["teacher"] == "wrn-10-1" and s["name"] == "wrn-10-0.5" and s["mac_ratio"] > 1
    assert s["pairs"][0]["teacher"]["module"] == "group0" and set(s["initial_terms"]) >= {"ce_weighted", "kd", "at", "loss"}
    assert "counts" not in r.stdout  # the human lines stay on stderr


def test_dry_run_says_counts_not_a_predicted_speed_up(atc, tiny_teacher, tiny_folder):
    r = atc("compress", "--teacher", str(tiny_teacher()), "--data", str(tiny_folder), "--preset", "demo", "--width-ratio", "0.5",
            "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "predicted speed-up" not in r.stderr and "(not a measured speed-up)" in r.stderr


def test_profile_takes_the_onnx_files_atc_writes(atc, tiny_teacher, tmp_path):
    model, spec, _ = load_model(tiny_teacher())
    export_checked(model.eval(), spec, tmp_path / "s.onnx")
    r = atc("profile", str(tmp_path / "s.onnx"), "--min-time", "0.05", "--json")
    assert r.returncode == 0, r.stderr
    prof = json.loads(r.stdout)
    assert prof["gmacs"] is None and prof["input_size"] == [3, 16, 16]
    assert 0.95 < prof["params"]["total"] / sum(p.numel() for p in model.parameters()) <= 1.0  # BatchNorm folded into the convolutions
    assert [lat["runtime"] for lat in prof["latency"]] == ["ort-cpu"] and prof["latency"][0]["threads"] == 1
    assert any("torch-cpu left out" in n for n in prof["gpu_notes"])


def test_a_missing_file_is_named_as_missing(atc):
    for command in (("derive", "--teacher", "nope.pt"), ("profile", "runs/nope.pt"), ("export", "nope.pt", "--out", "x.onnx")):
        r = atc(*command)
        line = assert_error(r, "nope.pt")
        assert "does not exist" in line and "unknown architecture" not in line, command


def test_the_preset_follows_the_data(atc, tiny_teacher, tmp_path):
    r = atc("compress", "--teacher", str(tiny_teacher(classes=10)), "--data", "digits", "--student", "wrn-10-0.5", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "preset demo (the data is the bundled digits; --preset picks another): 12 epochs" in r.stderr
    r = atc("train", "--arch", "wrn-10-1", "--data", "digits", "--epochs", "1", "--out", str(tmp_path / "t.pt"))
    assert r.returncode == 0, r.stderr
    assert "schedule: 1 epoch, lr 0.05, no drops (preset demo: the data is the bundled digits; --preset picks another)" in r.stderr


def test_attention_takes_the_student_checkpoint_by_its_own_name(atc, tiny_teacher, tmp_path):
    r = atc("attention", "--teacher", str(tiny_teacher()), "--student", "runs/x/student.pt", "--data", "digits",
            "--out", str(tmp_path / "m.png"))
    assert_error(r, "--student-checkpoint runs/x/student.pt")
    assert "--student-checkpoint" in atc("attention", "--help").stdout
