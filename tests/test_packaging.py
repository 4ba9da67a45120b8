"""The package: imports quietly, edits no sys.path, and a wheel ships every subpackage, the recipes and the
frozen evaluator (pyproject.toml lists the recipe package by hand; this checks the list is complete)."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def test_importing_gmmcond_prints_no_pkg_resources_warning():
    proc = subprocess.run([PY, "-W", "always", "-c", "import gmmcond"], capture_output=True, text=True)
    assert proc.returncode == 0 and "pkg_resources" not in proc.stderr, proc.stderr


def test_no_sys_path_edits_and_no_design_doc_references():
    files = [*ROOT.glob("launch/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("gmmcond/**/*.py")]
    offenders = [str(f) for f in files if f != Path(__file__) and "sys.path.insert" in f.read_text()]
    assert offenders == []
    assert "DESIGN.md" not in (ROOT / "README.md").read_text()


def test_a_wheel_ships_every_subpackage_and_the_recipes(tmp_path):
    proc = subprocess.run([PY, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "BuildBackendWarning" not in proc.stderr  # every importable folder is listed in pyproject.toml
    names = zipfile.ZipFile(next(tmp_path.glob("*.whl"))).namelist()
    recipes = sorted(p.name for p in (ROOT / "registry").glob("*.yaml"))
    assert sorted(n.split("/")[-1] for n in names if n.startswith("gmmcond/recipes/")) == recipes
    packages = sorted(str(p.parent.relative_to(ROOT)) for p in (ROOT / "gmmcond").rglob("__init__.py"))
    assert all(f"{p}/__init__.py" in names for p in packages), packages
    assert "gmmcond/eval/weights/shapes16.safetensors" in names
    # installed without the checkout, the recipes are found by name
    target = tmp_path / "site"
    subprocess.run([PY, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(next(tmp_path.glob("*.whl")))],
                   check=True, capture_output=True)
    code = "import gmmcond.config as c; print(c.RECIPES); print(c.load_config('shapes')['name'])"
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(target)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(target / "gmmcond" / "recipes"), "shapes"]


def test_no_function_on_the_sampling_evaluation_experiment_or_training_path_takes_more_than_ten_parameters():
    """Settings travel as objects (SamplingSettings, EvalSize, Options), not as long keyword lists or **kwargs.
    Exempt: ``forward`` (k-diffusion's model interface passes a sampler's extra_args as keywords) and the
    adapter that gives k-diffusion's samplers one signature (their options are the registry's, checked there)."""
    import ast

    offenders = []
    for folder in ("sampling", "eval", "experiments", "engine"):
        for path in (ROOT / "gmmcond" / folder).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name == "forward":
                    continue
                a = node.args
                names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs) if x.arg not in ("self", "cls")]
                if (len(names) + bool(a.vararg) > 10 or a.kwarg) and not (path.name == "samplers.py" and node.name == "sampler"):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert offenders == []
