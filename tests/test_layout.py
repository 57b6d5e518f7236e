"""The package's house plan (README, "How the code is laid out"), checked on the source itself.

Every ``import`` in ``sgfx/`` (at the top of a module or inside a function) is read with ``ast``; the resulting
module graph must have no cycle and must only point down the tiers: front end -> api and the tools beside it ->
engine -> passes -> layers -> obs/config/report -> runtime/layout. ``passes/`` hold graph transforms only, no
function is longer than 60 lines of code, and each option is declared once (in ``SparsifyConfig``).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import pathlib

import pytest
import torch

import sgfx

PACKAGE = pathlib.Path(sgfx.__file__).parent
MAX_FUNCTION_LINES = 60

# Lower numbers sit lower: a module may import from its own tier or a lower one, never from a higher one.
TIERS = {
    "sgfx.layout": 0, "sgfx.runtime": 0,
    "sgfx.config": 1, "sgfx.report": 1, "sgfx.quantize": 1,
    "sgfx.obs": 2,
    "sgfx.layers": 3,
    "sgfx.passes": 4, "sgfx.check": 4, "sgfx.finetune": 4,
    "sgfx.engine": 5, "sgfx.serialization": 5, "sgfx.lowering": 5,
    "sgfx.api": 6,
    "sgfx": 7, "sgfx.cli": 7,
}


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _exists(module: str) -> bool:
    path = PACKAGE.parent.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path: pathlib.Path, text: str | None = None) -> set[str]:
    """The sgfx modules ``path`` (or ``text`` given as its source) imports, anywhere in the file (lazy imports
    included)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text() if text is None else text)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "sgfx"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "sgfx":
                continue
            for alias in node.names:  # `from .x import y` where y is itself a module: that module
                found.add(f"{module}.{alias.name}" if _exists(f"{module}.{alias.name}") else module)
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def _tier(module: str) -> int:
    """The tier of ``module``: its own entry, else its folder's; -1 for a module in none (a top-level file
    that is not listed)."""
    original = module
    while module not in TIERS and "." in module:
        module = module.rpartition(".")[0]
    return -1 if module == "sgfx" and original != "sgfx" else TIERS.get(module, -1)


def test_every_module_has_a_tier():
    untiered = [m for m in _graph() if _tier(m) < 0]
    assert untiered == []


def test_no_import_points_up_a_tier():
    upward = [(module, target) for module, targets in _graph().items() for target in targets
              if _tier(target) > _tier(module)]
    assert upward == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return cycles


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_the_checker_sees_lazy_imports_and_cycles():
    """The checks above can fail: a function-level import is found, and a two-module circle is reported."""
    lazy = "import torch\n\ndef f():\n    from ..api import sparsify\n    from . import attention\n"
    found = _imports(PACKAGE / "passes" / "trace.py", lazy)
    assert found == {"sgfx.api", "sgfx.passes.attention"}
    assert _tier("sgfx.api") > _tier("sgfx.passes.trace")
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def _code_lines(source_lines: list[str], node: ast.AST) -> int:
    lines = set(range(node.lineno, node.end_lineno + 1))
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        lines -= set(range(body[0].lineno, body[0].end_lineno + 1))
    return sum(1 for n in lines if source_lines[n - 1].strip() and not source_lines[n - 1].strip().startswith("#"))


def test_no_function_over_sixty_lines_of_code():
    long = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                count = _code_lines(text.splitlines(), node)
                if count > MAX_FUNCTION_LINES:
                    long.append(f"{_module_name(path)}.{node.name}: {count}")
    assert long == []


def test_api_is_a_thin_entry():
    lines = (PACKAGE / "api.py").read_text().splitlines()
    assert len(lines) <= 150
    assert all(not target.startswith("sgfx.runtime.activations") for target in _imports(PACKAGE / "api.py"))


def test_passes_take_and_return_a_graph_module():
    from sgfx import passes

    assert passes.PASSES, "sgfx.passes lists its passes"
    for fn in passes.PASSES:
        hints = inspect.signature(fn)
        assert hints.return_annotation in ("torch.fx.GraphModule", torch.fx.GraphModule), fn.__name__
    files = {p.stem for p in (PACKAGE / "passes").glob("*.py")} - {"__init__"}
    assert files == {fn.__module__.rpartition(".")[2] for fn in passes.PASSES}


@pytest.mark.parametrize("option", [f.name for f in dataclasses.fields(sgfx.SparsifyConfig)])
def test_each_option_is_declared_once_and_reaches_sparsify_and_the_cli(option):
    """An option is a SparsifyConfig field: sparsify accepts it by name, its documentation comes from the field,
    and the CLI has a flag for it unless the field says it cannot be typed on a command line."""
    from sgfx.cli.main import build_parser
    from sgfx.config import build_config, option_help

    assert option_help(option)
    if option != "sparsity":  # given positionally; every other option is a keyword of sparsify
        assert build_config("2:4", {option: None}) == sgfx.SparsifyConfig("2:4")
    assert f"    {option}:" in sgfx.SparsifyConfig.__doc__
    field = next(f for f in dataclasses.fields(sgfx.SparsifyConfig) if f.name == option)
    cli = field.metadata["cli"]
    flag = (cli or {}).get("flag", "--" + option.replace("_", "-"))
    parser = build_parser()
    sparsify_parser = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith(
        "sparsify"))
    flags = {s for action in sparsify_parser._actions for s in action.option_strings}
    assert (flag in flags) == (cli is not None)
    assert cli is not None or option in ("leaf_modules", "concrete_args")  # Python objects only


def test_an_unknown_option_is_refused_with_the_accepted_ones():
    with pytest.raises(TypeError, match="unknown option.*dense_target.*accepted: method, blocksize"):
        sgfx.sparsify(torch.nn.Linear(8, 4), torch.randn(4, 8), "2:4", dense_target=True)
