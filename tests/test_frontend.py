"""The frontend's pure logic, run with Node's own test runner (no browser, no npm packages)."""
import shutil
import subprocess

import pytest

from conftest import ROOT


def test_picker_model_with_node():
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed; the frontend's logic tests need it")
    result = subprocess.run([node, "--test", str(ROOT / "tests" / "js")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "# pass 5" in result.stdout and "# fail 0" in result.stdout


def test_extension_modules_parse():
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed")
    for path in sorted((ROOT / "js").glob("*.js")):
        result = subprocess.run([node, "--check", str(path)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{path.name}: {result.stderr}"
