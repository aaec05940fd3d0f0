"""The product works from a wheel, not only from a source checkout: the specs ship inside the package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from conftest import REPO


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.relative_to(REPO).parent.parts) for p in (REPO / "adaptbank").rglob("__init__.py")}
    found |= {"adaptbank.tasks", "adaptbank.tasks.runs"}  # mapped from the top-level tasks/ folder
    assert found == listed


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory) -> Path:
    """The project built as a wheel and installed (without dependencies) into a fresh target folder."""
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(root / "dist"), str(REPO)], check=True, capture_output=True, text=True)
    wheels = list((root / "dist").glob("adaptbank-*.whl"))
    assert len(wheels) == 1
    target = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheels[0])],
                   check=True, capture_output=True, text=True)
    return target


def test_specs_resolve_from_the_installed_wheel_in_any_folder(installed_wheel, tmp_path):
    code = (
        "import adaptbank, sys; from pathlib import Path\n"
        "assert Path(adaptbank.__file__).is_relative_to(Path(sys.argv[1])), adaptbank.__file__\n"
        "from adaptbank.data.specs import load_task_spec, tasks_dir\n"
        "from adaptbank.continual.runspec import load_run_spec\n"
        "assert tasks_dir().is_relative_to(Path(sys.argv[1])), tasks_dir()\n"
        "print(load_task_spec('weather').train, load_task_spec('ag_news').name)\n"
        "print(load_run_spec('runs/builtin').task_names, load_run_spec('standard5-order1').task_names[0])\n"
    )
    env = {"PYTHONPATH": str(installed_wheel), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code, str(installed_wheel)], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "builtin:weather:train ag_news"
    assert lines[1] == "('weather', 'reviews', 'intent', 'topic') dbpedia"


def test_a_folder_of_ones_own_adds_to_the_shipped_specs(installed_wheel, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "faq.toml").write_text('name = "faq"\n[data]\ntrain = "faq.csv"\ntest = "faq.csv"\n'
                                   'labels = ["no", "yes"]\n')
    code = ("from adaptbank.data.specs import load_task_spec, list_task_specs\n"
            "s = load_task_spec('faq'); print(s.name, s.train.endswith('mine/faq.csv'), 'weather' in list_task_specs())")
    env = {"PYTHONPATH": str(installed_wheel), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
           "ADAPTBANK_TASKS": str(mine)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["faq", "True", "True"]
