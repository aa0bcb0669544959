"""The layout's rules, checked on the source: stages import only downward, heads are not
branched on outside their declaration, graphs are read by one function, and every pass declares
the flavours it serves."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "btdeploy"

# The order of ARCHITECTURE.md: a module may import its own stage and the ones before it.
STAGES = [
    {"errors", "progress", "hugepages", "cpu", "version", "signals", "imports", "swaps", "forks", "heap"},
    {"artifacts"},
    {"model"},
    {"backends"},
    {"export"},
    {"optimize"},
    {"quantize"},
    {"runtime"},
    {"verify"},
    {"apps"},
    {"serve"},
    {"bench"},
    {"cli", "__main__"},
    {"__init__"},  # the public API re-exports the runtime
]


def _stage(module: str) -> int:
    first = module.split(".")[1] if "." in module else "__init__"
    for index, names in enumerate(STAGES):
        if first in names:
            return index
    raise AssertionError(f"{module} belongs to no stage: add it to ARCHITECTURE.md and STAGES")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("btdeploy"):
            if node.module == "btdeploy":  # from btdeploy import X: X is a module or the public API
                found += [(node.lineno, f"btdeploy.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("btdeploy")]
        elif isinstance(node, ast.ImportFrom) and node.level:
            found.append((node.lineno, "relative"))
    return found


# Package data is shipped, not imported: data/triton/preprocess_model.py runs inside Triton's container.
SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if "data" not in p.relative_to(PACKAGE).parts)


def test_every_module_belongs_to_a_stage() -> None:
    assert len(SOURCES) > 40
    for path in SOURCES:
        _stage(_module_name(path))


def test_architecture_names_every_module() -> None:
    """ARCHITECTURE.md is the map of the package: a module it does not name is one a reader cannot find."""
    text = (PACKAGE.parent / "ARCHITECTURE.md").read_text()
    unnamed = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        # as code: `stem`, `stem.py`, `folder/stem` or `stem.attribute`, not a word of the prose
        if path.stem != "__init__" and not re.search(rf"`(?:[\w/]*/)?{re.escape(path.stem)}(?:\.py)?[`/ (.]", text)
    ]
    assert len(list(PACKAGE.rglob("*.py"))) > 40
    assert not unnamed, f"ARCHITECTURE.md does not name {unnamed}: say what each owns in its stage's row"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_stages_import_only_downward(path: Path) -> None:
    importer = _module_name(path)
    for line, imported in _imports(path):
        assert imported != "relative", f"{importer}:{line} uses a relative import; import btdeploy.<stage> instead"
        assert _stage(imported) <= _stage(importer), (
            f"{importer}:{line} imports {imported}, a later stage (see ARCHITECTURE.md)"
        )


def test_the_layering_check_catches_an_upward_import(tmp_path: Path) -> None:
    planted = PACKAGE / "model" / "planted_upward.py"
    source = "from btdeploy.verify.parity import compare\n"
    assert [(1, "btdeploy.verify.parity")] == _imports(_write(tmp_path / "x.py", source))
    assert _stage("btdeploy.verify.parity") > _stage(_module_name(planted))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _unguarded_serial_imports(source: str) -> list[int]:
    """Lines importing transformers outside `with serial_imports():` (btdeploy/imports.py)."""
    guarded: set[int] = set()
    tree = ast.parse(source)
    for node in ast.walk(tree):
        calls = [item.context_expr for item in node.items] if isinstance(node, ast.With) else []
        if any(isinstance(call, ast.Call) and getattr(call.func, "id", "") == "serial_imports" for call in calls):
            guarded |= {id(inner) for inner in ast.walk(node)}
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [alias.name for alias in node.names]
        if any(name.split(".")[0] == "transformers" for name in names) and id(node) not in guarded:
            lines.append(node.lineno)
    return lines


def test_every_transformers_import_holds_the_import_lock() -> None:
    """transformers' lazy module is not safe across threads (two heads loaded at once failed)."""
    offenders = [
        f"{path.relative_to(PACKAGE)}:{line}"
        for path in SOURCES
        for line in _unguarded_serial_imports(path.read_text())
    ]
    assert offenders == [], "import transformers inside `with serial_imports():` (btdeploy/imports.py)"
    planted = "from transformers import X\nwith serial_imports():\n    import transformers.a\n"
    assert _unguarded_serial_imports(planted) == [1]


def _direct_graph_reads(source: str) -> list[int]:
    """Lines that call onnx's own model readers."""
    tree = ast.parse(source)
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "onnx"
        and node.func.attr in {"load", "load_model", "load_model_from_string"}
    ]


def test_every_graph_is_read_by_load_graph() -> None:
    """onnx.load holds two copies of every weight, even when asked for none (on base 2.5 GB for a
    1.3 GB graph): graphs are read by artifacts/onnx_files.load_graph only."""
    offenders = [
        f"{path.relative_to(PACKAGE)}:{line}" for path in SOURCES for line in _direct_graph_reads(path.read_text())
    ]
    assert offenders == [], "read graphs with btdeploy.artifacts.onnx_files.load_graph"
    assert _direct_graph_reads("import onnx\nm = onnx.load(str(p), load_external_data=False)\n") == [2]


HEAD_BRANCH = re.compile(r"""\bhead(?:_name|\.name)?\s*(?:==|!=|in)\s*\(?\s*["'](?:base|itm|itc|mlm)["']""")


def test_no_module_branches_on_a_head_name_outside_the_declarations() -> None:
    offenders = []
    for path in SOURCES:
        if path.name == "heads.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if HEAD_BRANCH.search(line):
                offenders.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert offenders == [], "head behaviour belongs on the head's declaration in model/heads.py"
    assert HEAD_BRANCH.search('if head.name == "itc":') and HEAD_BRANCH.search("if head == 'mlm'")


def test_every_pass_declares_its_flavours_and_refuses_others() -> None:
    from btdeploy.artifacts.graph_names import Flavour
    from btdeploy.optimize.graph import Graph
    from btdeploy.optimize.passes import PASSES
    from btdeploy.optimize.passes.base import GraphPass, PassResult

    for graph_pass in PASSES:
        assert set(graph_pass.rewrites) == set(Flavour), graph_pass.name
    ort_only = GraphPass("ort-only", {Flavour.ORT: lambda graph: PassResult("ort-only")})
    with pytest.raises(ValueError, match="serves flavours ort, not trt"):
        ort_only.run(Graph.__new__(Graph), Flavour.TRT)
