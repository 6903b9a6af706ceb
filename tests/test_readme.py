"""The README's examples run as written (with a tiny `loader` standing in for the user's data)."""
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(blocks()) >= 4


def test_readme_examples_run(tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for code in blocks():
        if "torchvision" in code:  # images and class labels for the wrapped ResNet
            namespace["loader"] = [(torch.randn(2, 3, 32, 32), torch.randint(10, (2,))) for _ in range(2)]
        else:  # the 30 -> 30 regression the LeakyMLP examples use
            namespace["loader"] = [(torch.randn(8, 30), torch.randn(8, 30)) for _ in range(3)]
        exec(compile(code, str(README), "exec"), namespace)
    assert (tmp_path / "ckpt.pt").exists()
