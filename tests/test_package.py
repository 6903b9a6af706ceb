"""The shape of the package: what ``import adaptive_depth`` pulls in, what it installs, which names it keeps."""
import importlib
import importlib.metadata
import subprocess
import sys

import pytest

import adaptive_depth

APPLICATION_MODULES = ("matplotlib", "tqdm", "timm", "torchvision", "mnist1d", "sklearn", "torch_optimizer")


def test_import_pulls_no_plotting_progress_bar_or_model_zoo_module():
    # compare with what torch and triton import themselves (torch imports tqdm when it is installed)
    code = ("import sys, torch\n"
            "try:\n    import triton\nexcept ImportError:\n    pass\n"
            f"names = {APPLICATION_MODULES!r}\n"
            "before = {m for m in names if m in sys.modules}\n"
            "import adaptive_depth\n"
            "print(sorted(m for m in names if m in sys.modules and m not in before))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"import adaptive_depth imported {out.strip()}"


def test_distribution_installs_no_top_level_name_another_distribution_owns():
    top_level = importlib.metadata.distribution("adaptive-depth").read_text("top_level.txt")
    names = set(top_level.split()) if top_level else set()
    assert "kernels" not in names
    assert {"adaptive_depth", "adaptive_depth_kernels"} <= names


def test_core_requirements_are_torch_and_triton_only():
    requires = importlib.metadata.requires("adaptive-depth") or []
    core = sorted({r.split(";")[0].split(">")[0].split("=")[0].strip() for r in requires if "extra ==" not in r})
    assert core == ["torch", "triton"]


def test_kernels_package_never_imports_the_library():
    code = ("import sys\nimport adaptive_depth_kernels\n"
            "print([m for m in sys.modules if m == 'adaptive_depth' or m.startswith('adaptive_depth.')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_top_level_surface_is_the_design_cards():
    assert set(adaptive_depth.__all__) == {
        "leaky_update", "LeakyResidual", "LeakyResNet", "LeakyMLP", "AdaptiveSteps", "step_sizes", "wrap",
        "unwrap", "EffectiveDepthScheduler", "diagnose", "rules", "refine", "coarsen", "DepthScheduler", "__version__"}
    for name in adaptive_depth.__all__:
        assert getattr(adaptive_depth, name) is not None


@pytest.mark.parametrize("name, module", sorted(adaptive_depth._ALIASES.items()))
def test_names_exported_before_still_resolve_to_their_module_objects(name, module):
    assert getattr(adaptive_depth, name) is getattr(importlib.import_module(f"adaptive_depth.{module}"), name)


def test_unknown_top_level_name_raises_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        adaptive_depth.no_such_name  # noqa: B018


@pytest.mark.parametrize("old, new", sorted(adaptive_depth._moved.MOVED.items()))
def test_moved_modules_import_under_their_old_names(old, new):
    assert importlib.import_module(old) is importlib.import_module(new)


def test_from_import_of_a_moved_module_works():
    from adaptive_depth import data, train  # noqa: F401 - the old spelling
    assert train.RunConfig is importlib.import_module("adaptive_depth.experiments.train").RunConfig
