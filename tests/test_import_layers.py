"""The layering contract (setup.cfg, [importlinter]): lower layers never import higher ones, and
no package's modules import each other in a cycle. `lint-imports` reads every import, those inside
functions included."""

import shutil
import subprocess
import sys
from pathlib import Path

from testkit import ROOT



def test_lint_imports_keeps_the_layering_contract():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    proc = subprocess.run([exe, "setup.cfg"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "Layers: lower never import higher KEPT" in proc.stdout
    assert "No import cycles between the modules of any package KEPT" in proc.stdout
