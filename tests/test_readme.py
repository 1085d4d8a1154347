"""The README's "A minute of code" snippet runs as written (files written to a temporary
directory instead of the working directory)."""
import pathlib

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _snippet() -> str:
    text = README.read_text()
    part = text[text.index("## A minute of code"):]
    part = part[part.index("```python") + len("```python"):]
    return part[:part.index("```")]


def test_minute_of_code_snippet_runs(tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    pytest.importorskip("safetensors")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_snippet(), str(README) + ":minute-of-code", "exec"), scope)
    assert (tmp_path / "net.safetensors").exists() and (tmp_path / "net.onnx").exists()
    y, y_cpu = scope["y"], scope["y_cpu"]
    assert y.shape == (8, 10) and y.dtype == scope["torch"].float32
    assert scope["torch"].equal(y, y_cpu)  # CPU tensors: the same backend's bytes
