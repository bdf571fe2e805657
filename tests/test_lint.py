"""Static checks, at zero: the layering contract (setup.cfg, [importlinter]: lower layers never import
higher ones, and no package's modules import each other in a cycle; `lint-imports` reads every import,
those inside functions included), and pyflakes' rules (ruff's F: undefined names, unused imports,
redefinitions) on src/ and tests/."""

import shutil
import subprocess
import sys
from pathlib import Path

from testkit import ROOT


def _tool(name: str) -> str:
    return shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name) or name


def test_lint_imports_keeps_the_layering_contract():
    proc = subprocess.run([_tool("lint-imports"), "setup.cfg"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "Layers: lower never import higher KEPT" in proc.stdout
    assert "No import cycles between the modules of any package KEPT" in proc.stdout


def test_pyflakes_rules_find_nothing_in_src_and_tests():
    proc = subprocess.run([_tool("ruff"), "check", "--no-cache", "--select", "F", "--output-format", "concise",
                           "src", "tests"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
