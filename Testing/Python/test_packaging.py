"""The extension ships every engine file, and the engine never imports the Slicer side."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_module_cmake_lists_every_engine_file():
    cmake = (REPO / "SelfSupervisedSPECT" / "CMakeLists.txt").read_text()
    listed = set(re.findall(r"^\s+(sspect/\S+\.py)\s*$", cmake, flags=re.M))
    present = {str(p.relative_to(REPO / "SelfSupervisedSPECT")) for p in (REPO / "SelfSupervisedSPECT" / "sspect").rglob("*.py")}
    assert listed == present, f"missing from CMake: {sorted(present - listed)}; listed but absent: {sorted(listed - present)}"


def test_module_cmake_and_the_wheel_ship_every_engine_data_file():
    """Trained weights (and their descriptions) are read at run time: the extension installs them and the wheel includes them."""
    cmake = (REPO / "SelfSupervisedSPECT" / "CMakeLists.txt").read_text()
    listed = set(re.findall(r"^\s+(sspect/\S+\.(?:safetensors|json))\s*$", cmake, flags=re.M))
    present = {str(p.relative_to(REPO / "SelfSupervisedSPECT")) for p in (REPO / "SelfSupervisedSPECT" / "sspect").rglob("*")
               if p.is_file() and p.suffix not in (".py", ".pyc")}
    assert present and listed == present, f"not installed: {sorted(present - listed)}; listed but absent: {sorted(listed - present)}"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"sspect.weights" = ["*.safetensors", "*.json"]' in pyproject


def test_engine_never_imports_slicer_vtk_or_qt():
    pattern = re.compile(r"^\s*(import|from)\s+(slicer|vtk|qt|ctk)\b", flags=re.M)
    offenders = [str(p) for p in (REPO / "SelfSupervisedSPECT" / "sspect").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []
