"""The package as installed: core dependencies that are used and floors that hold, docstrings of the model
methods a user meets first, benchmark docstrings that stay inside the repository."""
import ast
import inspect
import re
from pathlib import Path

import pytest

from based.models import BasedConfig, BasedLM, TransformerConfig

ROOT = Path(__file__).resolve().parents[1]


def core_dependencies() -> dict[str, str]:
    """pyproject.toml's [project] dependencies: {lower-case distribution name: requirement}."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {re.match(r"[A-Za-z0-9_.-]+", req).group().lower(): req for req in project["dependencies"]}


def test_a_plain_install_has_what_save_pretrained_and_import_need():
    """save_pretrained writes safetensors by default, and `import torch` warns "Failed to initialize NumPy"
    without numpy: a plain `pip install .` must bring both, not only the test extra."""
    assert {"safetensors", "numpy"} <= set(core_dependencies())


def test_declared_dependencies_are_used_and_their_floors_hold():
    deps = core_dependencies()
    source = "\n".join(file.read_text() for file in (ROOT / "based").rglob("*.py"))
    imported = set(re.findall(r"^\s*(?:import|from) (\w+)", source, re.MULTILINE))
    # numpy is there for torch's import and Triton's interpreter, not imported by the package itself.
    assert set(deps) - {"numpy"} <= imported

    def floor(name):
        return tuple(int(part) for part in re.search(r">=\s*([\d.]+)", deps[name]).group(1).split("."))

    # Programmatic dependent launch came with Triton 3.4.0; torch 2.8 is the first to pin a Triton that has it.
    if "gdc_launch_dependents" in source or "launch_pdl" in source:
        assert floor("triton") >= (3, 4)
        assert floor("torch") >= (2, 8)
    if "torch.library.custom_op" in source or "register_autograd" in source:
        assert floor("torch") >= (2, 4)


@pytest.mark.parametrize("method", [BasedLM.from_pretrained, BasedLM.save_pretrained,
                                    BasedConfig.from_preset, TransformerConfig.from_preset],
                         ids=["from_pretrained", "save_pretrained", "BasedConfig", "TransformerConfig"])
def test_checkpoint_and_preset_docstrings_give_args_returns_raises(method):
    doc = inspect.getdoc(method)
    for section in ("Args:", "Returns:", "Raises:"):
        assert section in doc, f"{method.__qualname__}: no {section} section"
    for name, parameter in inspect.signature(method).parameters.items():
        if name != "self":
            spelled = f"**{name}" if parameter.kind is inspect.Parameter.VAR_KEYWORD else name
            assert f"    {spelled}:" in doc, f"{method.__qualname__}: argument {name} not described"


@pytest.mark.parametrize("script", sorted((ROOT / "benchmarks").glob("*.py")), ids=lambda path: path.name)
def test_benchmark_docstrings_point_only_inside_the_repository(script):
    doc = ast.get_docstring(ast.parse(script.read_text())) or ""
    assert "../" not in doc and "shared/" not in doc, f"{script.name} refers to files outside the repository"
