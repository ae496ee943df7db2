"""What can be checked about the Slicer module without the Slicer app: the .ui, the imports, the
packaging lists, the resources. (The headless self-test is test_slicer_module_selftest.py.)"""
import ast
import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "SelfSupervisedSPECT"
MODULE_FILE = MODULE_DIR / "SelfSupervisedSPECT.py"
PLUGIN_FILE = MODULE_DIR / "DICOMSPECTProjectionsPlugin.py"
LIB_DIR = MODULE_DIR / "SelfSupervisedSPECTLib"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "SelfSupervisedSPECT.ui"
WIDGET_CLASS = "SelfSupervisedSPECTWidget"
HEAVY = {"torch", "pytomography"}
QT_ONLY = {"qt", "ctk"}


def _ui_tree():
    return ET.parse(UI_FILE).getroot()


def _ui_object_names():
    return {element.get("name") for element in _ui_tree().iter() if element.tag in ("widget", "layout") and element.get("name")}


def _custom_widgets():
    return {cw.findtext("class"): cw.findtext("extends") for cw in _ui_tree().iter("customwidget")}


def _lib_files():
    return sorted(LIB_DIR.rglob("*.py"))


def _file_scope_imports(path):
    """Modules imported by statements that run when the file is imported (not inside def/class)."""
    found = []

    def visit(statements):
        for node in statements:
            if isinstance(node, ast.Import):
                found.extend(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.append(node.module.split(".")[0])
            elif isinstance(node, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
                for field in ("body", "orelse", "finalbody"):
                    visit(getattr(node, field, []) or [])
                for handler in getattr(node, "handlers", []) or []:
                    visit(handler.body)

    visit(ast.parse(path.read_text()).body)
    return found


def _imports_with_owner(path):
    """(module, enclosing class name or None, enclosing function name or None) for every import."""
    result = []

    def visit(node, owner_class, owner_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, child.name, None)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, owner_class, child.name)
            else:
                if isinstance(child, ast.Import):
                    result.extend((a.name.split(".")[0], owner_class, owner_function) for a in child.names)
                elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                    result.append((child.module.split(".")[0], owner_class, owner_function))
                visit(child, owner_class, owner_function)

    visit(ast.parse(path.read_text()), None, None)
    return result


# ---- the .ui ---------------------------------------------------------------------------------

def test_ui_parses_and_is_a_mrml_widget():
    root = _ui_tree()
    assert root.tag == "ui"
    top = root.find("widget")
    assert top is not None and top.get("class") == "qMRMLWidget" and top.get("name") == "SelfSupervisedSPECT"


def test_every_ui_widget_the_module_names_exists():
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text()))
    assert used, "the module names no widget of the .ui"
    missing = sorted(used - _ui_object_names())
    assert missing == [], f"the module uses widgets the .ui lacks: {missing}"


def test_ui_classes_are_qt_or_declared_custom_widgets():
    custom = _custom_widgets()
    for name, extends in custom.items():
        assert re.match(r"^(ctk|qMRML|qSlicer)\w+$", name), f"custom widget {name} is not a CTK/MRML/Slicer class"
        assert re.match(r"^(Q|ctk|qMRML|qSlicer)\w+$", extends or ""), f"{name} extends an unknown class {extends}"
    for element in _ui_tree().iter():
        if element.tag in ("widget", "layout"):
            cls = element.get("class")
            assert cls in custom or re.match(r"^Q[A-Z]\w+$", cls), f"{element.get('name')}: class {cls} is neither Qt nor declared"


def test_mrml_widgets_get_the_scene():
    """Each qMRML widget receives the scene through the template's mrmlSceneChanged connection."""
    root = _ui_tree()
    mrml_widgets = {w.get("name") for w in root.iter("widget")
                    if w.get("class", "").startswith("qMRML") and w.get("class") != "qMRMLWidget"}
    connected = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)" and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    assert mrml_widgets and mrml_widgets <= connected, f"no scene for {sorted(mrml_widgets - connected)}"


def test_device_combo_matches_the_module_devices():
    combo = next(w for w in _ui_tree().iter("widget") if w.get("name") == "deviceComboBox")
    tree = ast.parse(MODULE_FILE.read_text())
    devices = next(ast.literal_eval(node.value) for node in tree.body
                   if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "DEVICES" for t in node.targets))
    assert devices[:2] == ("auto", "cpu") and len(devices) == 3  # the third is the engine's GPU device name
    assert len(combo.findall("item")) == len(devices)


def test_binning_combo_matches_the_module_choices_and_the_engine_limits():
    combo = next(w for w in _ui_tree().iter("widget") if w.get("name") == "binningComboBox")
    tree = ast.parse(MODULE_FILE.read_text())
    choices = next(ast.literal_eval(node.value) for node in tree.body
                   if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "BINNING_CHOICES" for t in node.targets))
    texts = [item.findtext("property/string") for item in combo.findall("item")]
    assert choices[0] == 1 and len(texts) == len(choices)
    assert all(f"{b}x{b}" in text for b, text in zip(choices[1:], texts[1:])) and all(1 <= b <= 8 for b in choices)


def _constant(path: Path, name: str):
    return next(ast.literal_eval(node.value) for node in ast.parse(path.read_text()).body
                if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets))


def test_projector_combo_matches_the_module_choices_and_the_logic():
    combo = next(w for w in _ui_tree().iter("widget") if w.get("name") == "projectorComboBox")
    choices = _constant(MODULE_FILE, "PROJECTOR_CHOICES")
    assert choices == _constant(LIB_DIR / "logic.py", "PROJECTORS")
    texts = [item.findtext("property/string") for item in combo.findall("item")]
    assert choices[0] == "fast" and len(texts) == len(choices)
    assert texts[0].startswith("Fast") and texts[1].startswith("PyTomography")


def test_every_widget_and_layout_name_is_unique():
    """Slicer maps the .ui's object names to ``self.ui`` attributes: a repeated name hides a widget."""
    names = [e.get("name") for e in _ui_tree().iter() if e.tag in ("widget", "layout") and e.get("name")]
    assert sorted({n for n in names if names.count(n) > 1}) == []


def test_no_two_items_of_a_layout_share_a_cell():
    """Qt refuses a widget put into an occupied form-layout cell, so it would be missing from the panel."""
    for layout in _ui_tree().iter("layout"):
        cells = [(item.get("row"), item.get("column")) for item in layout.findall("item") if item.get("row") is not None]
        assert sorted({c for c in cells if cells.count(c) > 1}) == [], layout.get("name")


def test_scatter_smoothing_box_starts_at_the_engine_default_and_spans_its_range():
    from sspect.pipeline import Settings

    box = next(w for w in _ui_tree().iter("widget") if w.get("name") == "scatterSmoothingSpinBox")
    value = {prop.get("name"): float(prop.findtext("double")) for prop in box.findall("property") if prop.find("double") is not None}
    signature = next(node for node in ast.walk(ast.parse((LIB_DIR / "logic.py").read_text()))
                     if isinstance(node, ast.FunctionDef) and node.name == "build_job").args
    defaults = dict(zip([a.arg for a in signature.args][-len(signature.defaults):], signature.defaults))
    assert value["value"] == ast.literal_eval(defaults["scatter_smoothing_cm"]) == Settings().scatter_smoothing_cm
    assert (value["minimum"], value["maximum"]) == (0.0, 5.0)


def test_method_parameters_have_a_form_container():
    """Parameters are built from the registry into a QFormLayout (no GUI code per method)."""
    container = next(w for w in _ui_tree().iter("widget") if w.get("name") == "parametersWidget")
    assert container.find("layout").get("class") == "QFormLayout"
    source = MODULE_FILE.read_text()
    for method in ("osl-map", "bsrem", "dip"):
        assert f'"{method}"' not in source and f"'{method}'" not in source, f"the panel hard-codes method {method}"


# ---- imports ---------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [MODULE_FILE, PLUGIN_FILE, *_lib_files()], ids=lambda p: p.name)
def test_no_heavy_or_qt_import_at_file_scope(path):
    bad = sorted(set(_file_scope_imports(path)) & (HEAVY | QT_ONLY))
    assert bad == [], f"{path.name} imports {bad} when it is imported; import them inside the functions that need them"


@pytest.mark.parametrize("path", [MODULE_FILE, PLUGIN_FILE, *_lib_files()], ids=lambda p: p.name)
def test_slicer_side_never_imports_the_engine(path):
    assert "sspect" not in {module for module, _, _ in _imports_with_owner(path)}


def test_qt_and_heavy_imports_only_inside_widget_methods():
    offenders = [(module, cls, fn) for module, cls, fn in _imports_with_owner(MODULE_FILE)
                 if module in QT_ONLY | HEAVY and not (cls == WIDGET_CLASS and fn)]
    assert offenders == [], f"qt/ctk/torch imported outside the Widget's methods: {offenders}"


def test_lib_never_imports_qt_ctk_or_torch_anywhere():
    for path in _lib_files():
        bad = {module for module, _, _ in _imports_with_owner(path)} & (QT_ONLY | HEAVY)
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


def test_no_star_imports():
    for path in [MODULE_FILE, PLUGIN_FILE, *_lib_files()]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert all(alias.name != "*" for alias in node.names), f"star import in {path.name}"


def test_util_functions_are_called_through_slicer_util():
    """slicer-core copies slicer.util functions onto slicer.*; the real app does not."""
    import importlib.util

    spec = importlib.util.find_spec("slicer")
    util_source = Path(spec.origin).with_name("util.py")
    if not util_source.is_file():
        pytest.skip("slicer-core is not installed")
    util_functions = {node.name for node in ast.parse(util_source.read_text()).body if isinstance(node, ast.FunctionDef)}
    for path in [MODULE_FILE, PLUGIN_FILE, *_lib_files()]:
        used = set(re.findall(r"\bslicer\.(\w+)", path.read_text()))
        wrong = sorted(used & util_functions)
        assert wrong == [], f"{path.name} calls slicer.{wrong[0]}; write slicer.util.{wrong[0]}" if wrong else ""


def test_nothing_is_installed_at_import_or_setup():
    tree = ast.parse(MODULE_FILE.read_text())
    forbidden = {"pip_install", "pip_ensure", "installTorch", "installEnginePackages", "_offerInstallation",
                 "_engineReady", "_startMethodsListing", "_updateDeviceInfo", "methods", "gpuInformation"}
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        for fn in (n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name in ("__init__", "setup")):
            called = {getattr(c.func, "attr", getattr(c.func, "id", None)) for c in ast.walk(fn) if isinstance(c, ast.Call)}
            assert not called & forbidden, f"{cls.name}.{fn.name} calls {sorted(called & forbidden)}"


def _widget_function(name):
    widget = next(n for n in ast.parse(MODULE_FILE.read_text()).body if isinstance(n, ast.ClassDef) and n.name == WIDGET_CLASS)
    return next(n for n in widget.body if isinstance(n, ast.FunctionDef) and n.name == name)


def _called_names(function):
    return {getattr(c.func, "attr", getattr(c.func, "id", None)) for c in ast.walk(function) if isinstance(c, ast.Call)}


def test_entering_the_module_blocks_on_nothing():
    """The method listing and nvidia-smi take seconds: enter() only hands them to worker threads."""
    blocking = {"methods", "gpuInformation", "runBackgroundCommand", "installEnginePackages", "run", "Popen",
                "check_output", "wait", "result"}
    for name in ("enter", "_startMethodsListing", "_updateDeviceInfo"):
        called = _called_names(_widget_function(name))
        assert not called & blocking, f"{WIDGET_CLASS}.{name} calls {sorted(called & blocking)} on the GUI thread"
    assert "submit" in _called_names(_widget_function("_startMethodsListing"))
    assert "submit" in _called_names(_widget_function("_updateDeviceInfo"))


def test_every_process_starts_with_the_background_options():
    """No console window on Windows (closing it would kill the job) for any process the Slicer side starts."""
    for path in [MODULE_FILE, *_lib_files()]:
        for call in (n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)):
            if isinstance(call.func, ast.Attribute) and call.func.attr in ("run", "Popen", "check_output", "call") \
                    and getattr(call.func.value, "id", None) == "subprocess":
                spread = [k.value for k in call.keywords if k.arg is None]
                assert any(isinstance(v, ast.Call) and getattr(v.func, "id", None) == "background_process_options"
                           for v in spread), f"{path.name}:{call.lineno} starts a process without background_process_options()"


def test_torch_never_enters_slicers_process_and_no_dead_installer_api():
    """The engine's packages live in the engine's folder: Slicer's process neither imports torch nor asks
    the PyTorch extension (whose installTorch imports it), and slicer.pydeps exists in no Slicer."""
    source = MODULE_FILE.read_text()
    assert "torch" not in {module for module, _, _ in _imports_with_owner(MODULE_FILE)}
    assert "PyTorchUtils" not in source and "pydeps" not in source


def test_every_top_level_script_is_a_loadable_module():
    """Slicer's scripted-module factory loads every .py beside the module as a module named after the file."""
    for path in MODULE_DIR.glob("*.py"):
        classes = {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef)}
        assert path.stem in classes, f"{path.name} has no class {path.stem}; Slicer would fail to load it as a module"
    module_classes = {n.name for n in ast.parse(MODULE_FILE.read_text()).body if isinstance(n, ast.ClassDef)}
    assert {"SelfSupervisedSPECT", "SelfSupervisedSPECTWidget", "SelfSupervisedSPECTLogic", "SelfSupervisedSPECTTest"} <= module_classes


# ---- packaging -------------------------------------------------------------------------------

def _cmake_list(text, variable, module_name="SelfSupervisedSPECT"):
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, flags=re.S)
    assert match, f"{variable} is not set"
    return {item.replace("${MODULE_NAME}", module_name) for item in match.group(1).split()}


def test_cmake_lists_every_module_script_and_resource():
    cmake = (MODULE_DIR / "CMakeLists.txt").read_text()
    scripts = _cmake_list(cmake, "MODULE_PYTHON_SCRIPTS")
    present_scripts = {p.name for p in MODULE_DIR.glob("*.py")} | {str(p.relative_to(MODULE_DIR)) for p in _lib_files()}
    assert scripts == present_scripts, (f"missing from CMake: {sorted(present_scripts - scripts)}; "
                                        f"listed but absent: {sorted(scripts - present_scripts)}")
    resources = _cmake_list(cmake, "MODULE_PYTHON_RESOURCES")
    present_resources = {str(p.relative_to(MODULE_DIR)) for p in (MODULE_DIR / "Resources").rglob("*") if p.is_file()}
    assert resources == present_resources, (f"missing from CMake: {sorted(present_resources - resources)}; "
                                            f"listed but absent: {sorted(resources - present_resources)}")
    assert re.search(r"slicerMacroBuildScriptedModule\(\s*NAME \$\{MODULE_NAME\}\s+SCRIPTS \$\{MODULE_PYTHON_SCRIPTS\}"
                     r"\s+RESOURCES \$\{MODULE_PYTHON_RESOURCES\}\s+WITH_GENERIC_TESTS\s*\)", cmake)
    assert re.search(r"if\(BUILD_TESTING\)\s+(#.*\n\s*)*slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\)", cmake)
    assert "set(MODULE_NAME SelfSupervisedSPECT)" in cmake


def test_extension_urls_come_from_the_repository_variable_and_name_files_that_exist():
    """Homepage, icon and screenshots are made from EXTENSION_GITHUB_REPOSITORY (OWNER/NAME, set
    once the public repository exists); the icon and screenshots are raw files of this repository."""
    cmake = (REPO / "CMakeLists.txt").read_text()
    repository = "${EXTENSION_GITHUB_REPOSITORY}"
    assert cmake.index("set(EXTENSION_GITHUB_REPOSITORY ") < cmake.index("set(EXTENSION_HOMEPAGE ")
    assert re.search(r'set\(EXTENSION_HOMEPAGE "([^"]+)"\)', cmake).group(1) == f"https://github.com/{repository}"
    for variable in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        urls = re.search(rf'set\({variable} "([^"]+)"\)', cmake).group(1).split()
        assert urls, f"{variable} is empty"
        for url in urls:
            prefix = f"https://raw.githubusercontent.com/{repository}/main/"
            assert url.startswith(prefix), f"{variable} is not a raw file of the extension's repository: {url}"
            relative = url[len(prefix):]
            assert (REPO / relative).is_file(), f"{variable} names {relative}, which is not in the repository"


def test_icons_are_128_pixel_pngs():
    for path in (MODULE_DIR / "Resources" / "Icons" / "SelfSupervisedSPECT.png", REPO / "Resources" / "SelfSupervisedSPECT.png"):
        header = path.read_bytes()[:24]
        assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
        assert struct.unpack(">II", header[16:24]) == (128, 128), f"{path} is not 128 x 128"


def test_requirements_match_the_engine_dependencies():
    import tomllib

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    listed = [line.strip() for line in (MODULE_DIR / "Resources" / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.lstrip().startswith("#")]
    assert sorted(listed) == sorted(declared)
    assert not any(re.match(r"^torch\b", line) for line in listed), "torch is installed separately (PyTorch extension)"


def test_isotope_choices_match_the_engine_registry():
    from sspect.physics.isotopes import ISOTOPES

    combo = next(w for w in _ui_tree().iter("widget") if w.get("name") == "isotopeComboBox")
    choices = _constant(MODULE_FILE, "ISOTOPE_CHOICES")
    assert len(combo.findall("item")) == len(choices) and choices[0] is None
    assert tuple(choices[1:]) == _constant(LIB_DIR / "logic.py", "ISOTOPES") == tuple(ISOTOPES)
    assert _constant(LIB_DIR / "dicom.py", "MAIN_PHOTOPEAK_KEV") == {
        isotope.code_value: isotope.default_photopeaks_keV[0] for isotope in ISOTOPES.values()}
