"""The house rules of ARCHITECTURE.md, read from the code with `ast` (tests/support/import_graph.py): no import
circles, no project import hidden inside a function, each package importing only the layers it may, small files,
and a `vae/` whose top level is the entry script and the packages."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
from conftest import REPO
from support.import_graph import ROOT, circles, graph, modules

EDGES, IMPORTS = graph()

# package -> project packages it must never import (ARCHITECTURE.md, "Code map"). Entry points (`__main__`) compose
# the layers and are exempt.
FORBIDDEN = {
    "vae.models": ("vae.config", "vae.objectives", "vae.training", "vae.tracking", "vae.registry", "vae.launch",
                   "pipeline", "flows"),
    "vae.config": ("vae.objectives", "vae.training", "vae.tracking", "vae.registry", "vae.launch", "flows"),
    "vae.objectives": ("vae.training", "vae.tracking", "vae.registry", "vae.launch", "flows"),
    "vae.tracking": ("vae.models", "vae.objectives", "vae.training", "vae.registry", "vae.launch", "flows"),
    "vae.training": ("vae.registry", "vae.launch", "flows"),
    "vae.registry": ("vae.launch", "flows"),
    "vae.latents": ("vae.training", "vae.launch", "flows"),
    "vae.evaluation": ("vae.training", "vae.launch", "vae.latents", "flows"),
    "vae.launch": ("vae.models", "vae.objectives", "vae.tracking", "vae.registry", "vae.training.trainer", "flows"),
    "pipeline": ("vae", "flows"),
}
# third-party packages a layer must not import: a model is single-device code; losses never talk to MLflow
FORBIDDEN_LIBRARIES = {
    "vae.models": ("accelerate", "mlflow", "prefect", "webdataset"),
    "vae.objectives": ("accelerate", "mlflow", "prefect"),
    "vae.config": ("torch", "accelerate", "mlflow", "prefect"),
}
MAX_LINES = 400


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_import_graph_has_no_circles():
    assert circles(EDGES) == []


def test_no_project_import_hides_inside_a_function_in_vae_or_pipeline():
    hidden = [f"{i.source}:{i.line} {i.in_function}() imports {i.target}" for i in IMPORTS
              if i.in_function and not i.source.startswith("flows.")]
    assert hidden == []


def test_a_deferred_import_in_the_flows_says_why():
    """flows/ may defer a heavy import (the CLI's start, a flow process), but only with a comment saying so."""
    silent = [f"{i.source}:{i.line} {i.in_function}() imports {i.target}" for i in IMPORTS
              if i.in_function and i.source.startswith("flows.") and not i.comment]
    assert silent == []


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_each_package_imports_only_the_layers_below_it(package):
    crossing = sorted(f"{source} -> {target}" for source, targets in EDGES.items() for target in targets
                      if within(source, package) and not source.endswith("__main__")
                      and any(within(target, f) for f in FORBIDDEN[package]))
    assert crossing == []


@pytest.mark.parametrize("package", sorted(FORBIDDEN_LIBRARIES))
def test_each_package_leaves_out_the_libraries_it_must_not_need(package):
    found = []
    for name, path in modules().items():
        if not within(name, package):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            named = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            found += [f"{name} imports {n}" for n in named if n.split(".")[0] in FORBIDDEN_LIBRARIES[package]]
    assert found == []


def test_no_module_in_vae_or_pipeline_is_over_the_size_limit():
    long = {name: n for name, path in modules().items() if name.split(".")[0] in ("vae", "pipeline")
            and (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_vae_folder_shows_its_packages_and_the_entry_script_only():
    files = sorted(p.name for p in (ROOT / "vae").glob("*.py"))
    packages = sorted(p.name for p in (ROOT / "vae").iterdir() if (p / "__init__.py").is_file())
    assert files == ["__init__.py", "train.py"]
    assert packages == ["config", "evaluation", "latents", "launch", "models", "objectives", "registry", "tracking",
                        "training"]


def test_every_package_says_what_it_owns_and_what_it_never_imports():
    for init in sorted([*(REPO / "vae").glob("*/__init__.py"), REPO / "pipeline/__init__.py"]):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "Owns" in doc and "import" in doc, f"{init.relative_to(REPO)} does not say what it owns and imports"


def test_the_import_checker_finds_a_circle_and_a_hidden_import(tmp_path):
    """The rules above are only as good as the reader: a planted circle and function-level import are found."""
    for package in ("vae", "pipeline", "flows"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "vae" / "a.py").write_text("from vae import b\n")
    (tmp_path / "vae" / "b.py").write_text("def f():\n    from vae.a import x  # circle\n")
    edges, imports = graph(tmp_path)
    assert circles(edges) == [["vae.a", "vae.b"]]
    assert [(i.source, i.in_function, i.target, i.comment) for i in imports if i.in_function] == [
        ("vae.b", "f", "vae.a", "circle")]


def test_the_run_config_and_the_cli_import_without_torch():
    """The settings faces are light (pipeline.settings, vae.models.options): parsing a config and `vaepipe --help`
    never pay torch's import; the rest of each face loads on first use."""
    code = ("import sys, vae.config, flows.cli; vae.config.load_config(None, ['--model.arch', 'aekl']); "
            "assert 'torch' not in sys.modules, 'torch was imported'; "
            "import pipeline, vae.models; pipeline.open_loader; vae.models.build_model; "
            "assert 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=300)
