"""``atc``: derive → distil → measure → report → export, one command per step.

This file only builds the Typer app, registers the commands (one module per command group)
and maps errors: anything the user can fix prints one line, ``error: …``, and exits with code 2
(``--debug`` shows the traceback).
"""

from __future__ import annotations

import sys
import traceback

import typer

from cli import compress, inspect, studies, train
from cli.common import PanelCommand
from compressor.errors import AtcError, Interrupted

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="atc: compress a trained CNN teacher into a faster student with attention transfer + KD.")
STATE = {"debug": False}


def version_line() -> str:
    """``atc 0.2.0 (torch …, onnxruntime …, Python …)``, read from the installed packages without importing them."""
    import platform
    from importlib import metadata

    from compressor import __version__

    def installed(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    ort = next((installed(n) for n in ("onnxruntime", "onnxruntime-gpu") if installed(n) != "not installed"), "not installed")
    return f"atc {__version__} (torch {installed('torch')}, onnxruntime {ort}, Python {platform.python_version()})"


def _print_version(value: bool) -> None:
    if value:
        print(version_line())
        raise typer.Exit()


@app.callback()
def _global(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
            version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                         help="Print atc's version (and torch's, onnxruntime's, Python's) and exit.")) -> None:
    STATE["debug"] = debug


# The command list of `atc --help`: click cuts a docstring's first sentence to fit an 80-column
# terminal (mid-phrase, with "..."), so each command gets a whole line that fits.
SHORT_HELP = {
    "train": "Train a model from scratch (e.g. a teacher).",
    "compress": "Distil a faster student from a teacher; report, export.",
    "derive": "List student candidates: params, GMACs, ratios.",
    "profile": "Params, GMACs and latency of one model or ONNX file.",
    "export": "Export to ONNX (and INT8); check parity.",
    "report": "Rebuild the report of finished runs.",
    "demo": "The whole job on the bundled digits, on the CPU.",
    "attention": "Attention maps, teacher/student agreement.",
    "sweep": "Distil over a grid of settings and seeds.",
    "models": "The model families atc knows; how to name others.",
    "inspect_checkpoint": "What a checkpoint holds and how atc reads it.",
}


def _examples(*lines: str) -> str:
    """An epilog of examples that click prints as written (``\\b``: no re-wrapping)."""
    return "Examples:\n\n\b\n" + "\n".join(f"  {line}" for line in lines)


EXAMPLES = {
    "train": _examples("atc train --arch wrn-16-2 --data digits --out teacher.pt",
                       "atc train --arch wrn-40-4 --data DIR --epochs 30 --out wrn-40-4.pt"),
    "compress": _examples("atc compress --teacher teacher.pt --data digits --out runs/x --dry-run",
                          "atc compress --teacher wrn-40-4.pt --data DIR --students 3 --pick 3x --out runs/x"),
    "derive": _examples("atc derive --teacher wrn-40-4.pt", "atc derive --teacher resnet18 --input-size 3x224x224 --num-classes 1000"),
    "profile": _examples("atc profile runs/x/student.pt --threads 1", "atc profile runs/x/students/NAME/student.int8.onnx"),
    "export": _examples("atc export runs/x/student.pt --out student.onnx",
                        "atc export runs/x/student.pt --out student.onnx --int8 --calib-data DIR"),
    "report": _examples("atc report runs/x", "atc report runs/x runs/y --out runs/merged"),
    "demo": _examples("atc demo", "atc demo --out /tmp/demo --students 1"),
    "attention": _examples("atc attention --teacher t.pt --student-checkpoint runs/x/student.pt --data digits --out maps.png",
                           "atc attention --teacher shapes-t.pt --data shapes --localization --overlay"),
    "sweep": _examples("atc sweep --teacher t.pt --data digits --grid beta=0,1e3 --seeds 2 --out runs/sweep",
                       "atc sweep --teacher t.pt --data DIR --student wrn-16-1 --grid attention=sum-p:2,max-p:2 --jobs 2"),
    "models": _examples("atc models", "atc models 'mobilenet*'"),
    "inspect_checkpoint": _examples("atc inspect teacher.pt", "atc inspect last.pth --json"),
}

for command in (train.train, compress.compress, inspect.derive, inspect.profile, inspect.export, inspect.report,
                compress.demo, studies.attention, studies.sweep, inspect.models):
    app.command(cls=PanelCommand, short_help=SHORT_HELP[command.__name__], epilog=EXAMPLES[command.__name__])(command)
app.command("inspect", cls=PanelCommand, short_help=SHORT_HELP["inspect_checkpoint"],
            epilog=EXAMPLES["inspect_checkpoint"])(inspect.inspect_checkpoint)


def run() -> None:
    """Console entry point: one-line errors and exit code 2 for anything the user can fix."""
    try:
        code = app(standalone_mode=False, prog_name="atc")
    except AtcError as exc:
        if STATE["debug"]:
            traceback.print_exc()
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as exc:  # SIGINT/SIGTERM during training: the state is saved, --resume continues
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        sys.exit(128 + exc.signum)
    except typer.Abort:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except typer.TyperException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `atc`: the usage as click prints it (Typer checks the same way)
            exc.show()
            sys.exit(2)
        msg = exc.format_message().replace("\n", " ")
        ctx = getattr(exc, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        print(f"error: {msg}{hint}", file=sys.stderr)
        sys.exit(exc.exit_code if exc.exit_code != 1 else 2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # the environment failed, not atc: a full disk, device memory; anything else is a bug
        message = _environment_error(exc)
        if message is None:
            raise
        if STATE["debug"]:
            traceback.print_exc()
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _environment_error(exc: BaseException) -> str | None:
    """A one-line message for failures of the machine that reach the CLI outside atc's own checks."""
    import errno

    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return f"no space left on the device while writing {exc.filename or 'output'}; free some space and run the command again"
    if isinstance(exc, PermissionError):
        return f"permission denied: {exc.filename or exc}; check that you can read the inputs and write the output folder"
    if type(exc).__name__ == "OutOfMemoryError":
        return "CUDA ran out of memory; pass a smaller --batch-size or use --device cpu"
    return None


if __name__ == "__main__":
    run()
