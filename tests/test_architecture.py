"""The package's layers and import cycles (docs/architecture.md#layers), checked without import-linter.

``make test`` runs ``lint-imports`` with the contracts of pyproject.toml; these tests read the same contracts and
check the import graph themselves (grimp, the graph import-linter builds on), so that a new cycle or upward import
fails the suite even where ``lint-imports`` is not run, and a new subpackage or top-level module cannot be left out
of the layers.
"""

from __future__ import annotations

import pkgutil
import re
from pathlib import Path

import grimp
import pytest

import nnunet_ood
from nnunet_ood.errors import OODStateError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own TOML reader
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "nnunet_ood"


def contracts() -> dict[str, dict]:
    """The import-linter contracts of pyproject.toml by id."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    assert config["root_package"] == PACKAGE
    return {c["id"]: c for c in config["contracts"]}


def import_graph(type_checking: bool) -> grimp.ImportGraph:
    """The package's module-level import graph; ``type_checking``: with the imports under ``TYPE_CHECKING``."""
    return grimp.build_graph(PACKAGE, exclude_type_checking_imports=not type_checking, cache_dir=None)


def cycles(graph: grimp.ImportGraph, ignored: set[tuple[str, str]] = frozenset()) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    edges = {m: [n for n in targets if (m, n) not in ignored] for m, targets in edges.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, 0)]
        while work:
            module, position = work.pop()
            if position == 0:
                index[module] = low[module] = len(index)
                stack.append(module)
                on_stack.add(module)
            for i in range(position, len(edges[module])):
                target = edges[module][i]
                if target not in index:
                    work += [(module, i + 1), (target, 0)]
                    break
                if target in on_stack:
                    low[module] = min(low[module], index[target])
            else:
                if low[module] == index[module]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == module:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[module])
    return found


def test_cycle_finder_finds_a_cycle() -> None:
    graph = grimp.ImportGraph()
    for importer, imported in (("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.c", "p.d"), ("p.d", "p.e")):
        graph.add_import(importer=importer, imported=imported)
    assert cycles(graph) == [["p.a", "p.b", "p.c"]]
    assert cycles(graph, {("p.c", "p.a")}) == []


def test_no_import_cycles() -> None:
    """No cycle between modules at run time: every import, at module level or inside a function, counts."""
    assert cycles(import_graph(type_checking=False)) == []


def test_type_checking_imports_close_no_cycle_but_the_declared_back_references() -> None:
    """With the imports made only for type checkers, the only cycles are the back-references pyproject.toml
    declares (``ignore_imports`` of the acyclic contract), and each of them is such an import."""
    declared = {tuple(s.strip() for s in line.split("->")) for line in contracts()["acyclic"].get("ignore_imports", [])}
    full, runtime = import_graph(type_checking=True), import_graph(type_checking=False)
    for importer, imported in declared:
        assert full.direct_import_exists(importer=importer, imported=imported), (importer, imported)
        assert not runtime.direct_import_exists(importer=importer, imported=imported), (importer, imported)
    assert cycles(full, declared) == []


def layers() -> list[tuple[list[str], bool]]:
    """The layers contract's layers, highest first: (names, independent)."""
    contract = contracts()["layers"]
    assert contract["type"] == "layers" and contract["containers"] == [PACKAGE] and contract["exhaustive"]
    out = []
    for layer in contract["layers"]:
        independent = ":" not in layer
        out.append(([name.strip() for name in re.split(r"[|:]", layer)], independent))
    return out


def test_the_layers_cover_every_subpackage_and_top_level_module_once() -> None:
    declared = [name for names, _ in layers() for name in names]
    actual = {info.name for info in pkgutil.iter_modules(nnunet_ood.__path__)}
    assert sorted(declared) == sorted(actual)
    assert len(declared) == len(set(declared))


def test_no_import_goes_up_a_layer_or_across_independent_siblings() -> None:
    """The layers contract, checked on the graph with every import (type-checking ones too)."""
    position = {name: (rank, independent) for rank, (names, independent) in enumerate(layers()) for name in names}
    graph = import_graph(type_checking=True)
    wrong = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            source, target = importer.split(".")[1:2], imported.split(".")[1:2]
            if not source or not target or source == target:  # the root package, or inside one child
                continue
            (source_rank, independent), (target_rank, _) = position[source[0]], position[target[0]]
            if source_rank > target_rank or (source_rank == target_rank and independent):
                wrong.append(f"{importer} -> {imported}")
    assert wrong == []


# ---------------------------------------------------------------------- the worked example of docs/architecture.md
def example_code() -> dict[str, str]:
    """The code blocks of the doc's worked example of a feature-distance method, by the file they go in."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text[text.index("**A feature distance"):text.index("**Other kinds**")]
    blocks = re.findall(r"(`[^`\n]+`):\n\n\s*```python\n(.*?)\n\s*```", section, flags=re.S)
    out = {path.strip("`"): "\n".join(line[3:] if line.startswith("   ") else line for line in code.splitlines())
           for path, code in blocks}
    out["registry line"] = re.search(r'add `("nnunet_ood\.methods\.[a-z_]+:[A-Za-z]+",)`', section).group(1)
    return out


@pytest.fixture()
def example(tmp_path, monkeypatch):
    """The doc's method module, importable as a module of its own, and its registry line: nothing else."""
    code = example_code()
    module = "nnunet_ood/methods/channel_means.py"
    assert set(code) == {module, "registry line"}, set(code)
    (tmp_path / "example_method.py").write_text(code[module])
    monkeypatch.syspath_prepend(str(tmp_path))
    line = code["registry line"].strip('",')
    assert line == "nnunet_ood.methods.channel_means:ChannelMeanMahalanobis"
    return line.replace("nnunet_ood.methods.channel_means", "example_method")


def test_the_worked_example_is_one_method_and_one_registry_line(example, tmp_path) -> None:
    """The doc's feature-distance method, registered as its registry line does, scores what a brute-force
    computation gives (numpy channel means, scikit-learn's Ledoit-Wolf Mahalanobis distance), keeps a state file
    of its own next to mahalanobis', and its module stays light (no torch at import)."""
    import subprocess
    import sys

    import numpy as np
    import torch
    from sklearn.covariance import LedoitWolf

    from nnunet_ood.fitting.options import FitOptions
    from nnunet_ood.inference.case_scorer import CaseScorer
    from nnunet_ood.methods import _METHODS, FoldModels, MethodKind, MethodRegistry

    registry = MethodRegistry.from_paths([*_METHODS, example])
    method = registry["channel_mahalanobis"]
    assert registry.names[-1] == "channel_mahalanobis" and method.kind is MethodKind.PATCH_FEATURES
    assert method in registry.default_fit and "channel_mahalanobis" in registry.fit_help()

    rng = np.random.default_rng(0)
    train = rng.normal(size=(200, 6, 3, 3)) * rng.uniform(0.5, 2, size=(1, 6, 1, 1))
    test = rng.normal(size=(5, 6, 3, 3)) * 2
    detector = method.new_detector(FitOptions(), torch.device("cpu"))
    detector.fit(method.features(torch.from_numpy(train).float(), FoldModels()))
    expected = LedoitWolf().fit(train.astype(np.float32).mean(axis=(2, 3))).mahalanobis(
        test.astype(np.float32).mean(axis=(2, 3)))

    models = FoldModels(detectors={"channel_mahalanobis": detector})
    scorer = CaseScorer([method], [models], {}, region_based=False, patch_size=(4, 4), use_gaussian=True,
                        map_device=torch.device("cpu"))
    for i, bottleneck in enumerate(torch.from_numpy(test).float()):  # one case of one patch per test bottleneck
        scorer.begin_case(torch.zeros(1, 4, 4))
        scorer.begin_fold((4, 4), [(slice(None), slice(0, 4), slice(0, 4))], (slice(0, 4), slice(0, 4)),
                          torch.device("cpu"))
        scorer.add_bottleneck(bottleneck[None])
        scorer.finish_window()
        scorer.end_fold(None)
        assert scorer.finish_case(None).scores["channel_mahalanobis"] == pytest.approx(expected[i], rel=1e-5)

    # mahalanobis' own state in the same folder (the same detector class) stays apart from the example's
    mahalanobis = registry["mahalanobis"]
    other = mahalanobis.new_detector(FitOptions(), "cpu").fit(torch.from_numpy(rng.normal(size=(9, 2))))
    other_entry = mahalanobis.state_entry(FoldModels(detectors={"mahalanobis": other}), str(tmp_path))
    entry = method.state_entry(models, str(tmp_path))
    assert entry["file"] == "channel_mahalanobis.safetensors" and other_entry["file"] == "mahalanobis.safetensors"
    loaded = FoldModels()
    method.load_state(entry, str(tmp_path), loaded, "cpu")
    mahalanobis.load_state(other_entry, str(tmp_path), loaded, "cpu")
    features = method.features(torch.from_numpy(test).float(), loaded)
    np.testing.assert_allclose(loaded.detectors["channel_mahalanobis"].score(features).numpy(), expected, rtol=1e-5)
    assert loaded.detectors["mahalanobis"].n_features_in_ == 2
    with pytest.raises(OODStateError, match="holds a 'mahalanobis' detector, not 'channel_mahalanobis'"):
        type(other).load(tmp_path / "mahalanobis.safetensors", state_name="channel_mahalanobis")

    imported = subprocess.run([sys.executable, "-c", "import sys, example_method; print('torch' in sys.modules)"],
                              cwd=tmp_path, capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------- sizes (issue 24)
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def oversized() -> list[str]:
    """Every module of the package over :data:`MAX_MODULE_LINES` lines and every function or method over
    :data:`MAX_FUNCTION_LINES` (from its ``def`` to its last line, decorators not counted)."""
    import ast

    found = []
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        text = path.read_text()
        where = path.relative_to(ROOT).as_posix()
        n_lines = len(text.splitlines())
        if n_lines > MAX_MODULE_LINES:
            found.append(f"{where}: {n_lines} lines (at most {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text, filename=where)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{where}:{node.lineno} {node.name}: {length} lines (at most {MAX_FUNCTION_LINES})")
    return found


def test_no_module_over_400_lines_and_no_function_over_60() -> None:
    """Split a module by concern, a function into named steps, before it grows past the limits."""
    found = oversized()
    assert not found, "too long:\n" + "\n".join(found)
