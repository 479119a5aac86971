"""No module of ours may take a top-level import name that an installed distribution or the
standard library owns. A script run as `python bench/X.py` puts bench/ first on sys.path, and
pytest (its default import mode, tests/ having no __init__.py) puts each folder of tests/ there:
every file in those folders is then a top-level name that shadows a package of the same name
(bench/kernels.py broke `import transformers`, which imports the PyPI package `kernels`). CI
installs the newest dependencies, which may bring new names: this test names the file to
rename."""

import importlib.metadata
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OURS = "qwen3-aot"  # our own distribution, whose top-level name is src/'s package


def top_level_names() -> dict[str, Path]:
    """Each top-level module name our tree puts on sys.path, with the file or folder that takes it."""
    names: dict[str, Path] = {}
    for package in (REPO / "src").iterdir():
        if (package / "__init__.py").is_file():
            names[package.name] = package
    for folder in ("bench", "scripts"):  # run as python FOLDER/X.py
        for path in (REPO / folder).glob("*.py"):
            names[path.stem] = path
    for path in (REPO / "tests").rglob("*.py"):  # test modules and their helpers alike
        if path.name != "conftest.py":  # pytest's own name, which it imports apart
            names[path.stem] = path
    return names


def taken_names() -> dict[str, str]:
    """Top-level names that something else owns: what each installed distribution (but ours)
    provides, and the standard library's modules."""
    taken = {name: f"the installed distribution {', '.join(sorted(set(dists)))}"
             for name, dists in importlib.metadata.packages_distributions().items() if set(dists) != {OURS}}
    taken.update({name: "the standard library" for name in sys.stdlib_module_names})
    return taken


def test_our_top_level_names_shadow_no_installed_or_standard_module():
    ours, taken = top_level_names(), taken_names()
    assert "qwen3_aot" in ours and "e2e_bench" in ours and "suite_support" in ours  # the scan sees every folder
    clashes = [f"{path.relative_to(REPO)} takes '{name}', a top-level name of {taken[name]}: rename it"
               for name, path in sorted(ours.items()) if name in taken]
    assert not clashes, "\n".join(clashes)
