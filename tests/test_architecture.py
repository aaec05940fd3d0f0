"""The layering of DESIGN.md 2.1, checked by import-linter's contract in pyproject.toml, and the
torch-free modules staying torch-free."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_layers_contract_holds():
    out = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                          "lint_imports_command()"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 kept, 0 broken" in out.stdout


def test_metrics_report_and_store_import_without_torch():
    code = ("import sys; import adaptbank.metrics, adaptbank.report.build, adaptbank.bank.store, adaptbank.bank.maintenance, adaptbank.data.specs, adaptbank.continual.runspec; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
