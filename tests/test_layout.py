"""The library's layout stays walkable: no import circles between its modules (imports inside
functions count too: they are how circles hide), the CLI is only reached from the CLI, every
import points to the same or an earlier step of the pipeline, the report only renders, the
pipeline only sequences, and no library function takes more than twelve parameters."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(packages=("compressor", "cli")) -> dict[str, set[str]]:
    """module → the package modules it imports anywhere in its code (``from x import y`` counts
    ``x.y`` when that is a module, else ``x``)."""
    modules = {_module_name(p): p for pkg in packages for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names]
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name and not name.startswith(t + "."):  # a module's own package is not a dependency
                    graph[name].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_cycle_finder_finds_a_planted_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circles_in_the_library_or_the_cli():
    graph = import_graph()
    assert "compressor.pipeline" in graph and "compressor.distill.loop" in graph["compressor.pipeline"]
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " → ".join(cycle)


def test_the_library_never_imports_the_cli():
    graph = import_graph()
    offenders = {m: sorted(d) for m, d in graph.items() if m.startswith("compressor") and any(x.startswith("cli") for x in d)}
    assert not offenders


# ---------------------------------------------------------------- steps in order

# The library's steps from the bottom up: a module may import its own step and the ones below it,
# never one above. "tools" are the measuring and pairing helpers that several steps use (derive
# times candidates, distill evaluates each epoch); "measure" holds the step and its typed entries.
STEPS = [
    ("foundation", ("compressor", "compressor.errors", "compressor.events", "compressor.units", "compressor.fileio", "compressor.quiet",
                    "compressor.config", "compressor.device", "compressor.distributed", "compressor.pruning", "compressor.options")),
    ("models", ("compressor.models",)),
    ("data", ("compressor.data",)),
    ("tools", ("compressor.pair", "compressor.evaluate", "compressor.export", "compressor.profiling")),
    ("load", ("compressor.load",)),
    ("derive", ("compressor.derive",)),
    ("distill", ("compressor.distill",)),
    ("dry run", ("compressor.dryrun",)),
    ("measure", ("compressor.entries", "compressor.measure")),
    ("report", ("compressor.report",)),
    ("pipeline", ("compressor.pipeline",)),
    ("studies", ("compressor.studies",)),
]


def step_of(module: str) -> int:
    """The index in ``STEPS`` of the step ``module`` belongs to (the longest matching name wins)."""
    best, found = -1, None
    for i, (_, names) in enumerate(STEPS):
        for n in names:
            if (module == n or module.startswith(n + ".")) and len(n) > best:
                best, found = len(n), i
    assert found is not None, f"{module} belongs to no step in tests/test_layout.py STEPS; add it to one"
    return found


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} ({STEPS[step_of(m)][0]}) → {d} ({STEPS[step_of(d)][0]})" for m, deps in graph.items()
                  if m.startswith("compressor") for d in deps if d.startswith("compressor") and step_of(d) > step_of(m))


def test_the_step_checker_finds_a_planted_upward_import():
    assert upward_imports({"compressor.load": {"compressor.report.build"}}) == [
        "compressor.load (load) → compressor.report.build (report)"]
    assert upward_imports({"compressor.report.build": {"compressor.load"}}) == []


def test_no_step_imports_a_later_one():
    graph = import_graph()
    assert not upward_imports(graph)


def closure(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for d in graph.get(todo.pop(), ()):
            if d not in seen:
                seen.add(d)
                todo.append(d)
    return seen


def test_the_report_renders_and_never_trains_exports_or_times():
    """``report/`` turns the measure step's entries into files; it imports nothing of distill/, export/
    or profiling/, not even through another module."""
    graph = import_graph()
    report = [m for m in graph if m.startswith("compressor.report")]
    assert "compressor.report.build" in report
    forbidden = ("compressor.distill", "compressor.export", "compressor.profiling", "compressor.measure")
    reached = {m: sorted(d for d in closure(graph, m) if d.startswith(forbidden)) for m in report}
    assert not {m: d for m, d in reached.items() if d}


def test_the_pipeline_only_sequences():
    assert len((ROOT / "compressor" / "pipeline.py").read_text().splitlines()) < 250


MAX_PARAMETERS = 12


def parameter_counts(source: str) -> dict[str, int]:
    """Function name → parameters a caller can pass (``self``/``cls`` of a method not counted)."""
    counts = {}
    tree = ast.parse(source)
    methods = {id(f) for c in ast.walk(tree) if isinstance(c, ast.ClassDef) for f in c.body
               if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            n = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + (a.vararg is not None) + (a.kwarg is not None)
            first = (a.posonlyargs + a.args)[:1]
            if id(node) in methods and first and first[0].arg in ("self", "cls"):
                n -= 1
            counts[f"{node.name}:{node.lineno}"] = n
    return counts


def test_the_parameter_counter_counts():
    src = "def f(a, b, *c, d=1, **e): pass\nclass K:\n    def m(self, x): pass\n"
    assert parameter_counts(src) == {"f:1": 5, "m:3": 1}


def test_no_library_function_takes_more_than_twelve_parameters():
    """Options and results cross boundaries as dataclasses (``StudentChoice``, ``RunOptions``, …), not
    as keyword cascades."""
    too_many = {f"{p.relative_to(ROOT)}:{name}": n for p in sorted((ROOT / "compressor").rglob("*.py"))
                for name, n in parameter_counts(p.read_text()).items() if n > MAX_PARAMETERS}
    assert not too_many


def test_every_public_name_resolves_to_what_it_names():
    """``from compressor import NAME`` gives the function or class, never a submodule of the same name."""
    import importlib
    import inspect

    import compressor

    importlib.import_module("compressor.dryrun")  # a submodule imported first must not shadow a public name
    for name in compressor.__all__:
        value = getattr(compressor, name)
        assert not inspect.ismodule(value), name
    assert compressor.dry_run.__module__ == "compressor.dryrun" and callable(compressor.compress)
