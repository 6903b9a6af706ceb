"""The main job: `adaptive-depth demo` end to end on a tiny budget, and the command-line plumbing."""
import json
import subprocess
import sys

import pytest

from adaptive_depth.cli import build_parser, main


def test_demo_writes_table_json_and_plots(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--steps", "40", "--depth", "4", "--width", "16", "--lt", "3", "--every", "2",
                 "--no-progress", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "| uniform" in text and "| equal_distance" in text and "steps to test" in text
    for name in ("results.json", "loss_curves.png", "step_profile.png", "effective_rank.png"):
        assert (out / name).stat().st_size > 0, name
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["config"]["rule"] for r in runs] == ["uniform", "equal_distance"]
    assert runs[0]["final_steps"] == pytest.approx([0.25] * 4)
    assert runs[1]["final_steps"] != pytest.approx([0.25] * 4)  # the adaptive run moved its steps
    assert sum(runs[1]["final_steps"]) == pytest.approx(1.0, rel=1e-5)
    for r in runs:
        assert r["history"]["train_loss"][-1] < r["history"]["train_loss"][0]


def test_demo_on_mnist1d(tmp_path, capsys):
    pytest.importorskip("mnist1d")
    code = main(["demo", "--data", "mnist1d", "--steps", "20", "--depth", "3", "--width", "16", "--lt", "1",
                 "--no-progress", "--out", str(tmp_path)])
    assert code == 0
    assert "test error" in capsys.readouterr().out


def test_module_entry_point_and_help():
    done = subprocess.run([sys.executable, "-m", "adaptive_depth", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "demo" in done.stdout
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--scheme", "rk4"])
    assert main([]) == 2
