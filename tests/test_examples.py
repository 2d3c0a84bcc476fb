"""The example scripts run as a user would run them (CPU here; the GPU takes the same code path)."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
EXAMPLES = Path(__file__).parent.parent / "examples"


def test_generate_example_decodes_twice_and_reports_the_quantized_layers():
    result = subprocess.run([sys.executable, str(EXAMPLES / "generate.py"), "--new-tokens", "4"],
                            capture_output=True, text=True, timeout=600, check=True)
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[:2]] == ["first (compiles)", "second"]
    tokens = next(line for line in lines if line.startswith("tokens:"))
    assert len(tokens.removeprefix("tokens:").strip("[] ").split(",")) == 4
    assert "fp4compile: 14 layer(s) quantized" in result.stdout
