"""Headless CI shim: the few pieces of 3D Slicer that exist only in the real app, on slicer-core.

slicer-core (PyPI) carries real MRML (scene, nodes, logics, storage, segmentations) but not the
Qt application. A scripted module needs two things from the app before its Logic and Test
classes can run: the ``slicer.ScriptedLoadableModule`` base classes and ``slicer.mrmlScene``.
This module installs exactly those, and nothing else:

- ``slicer.mrmlScene``: a real ``vtkMRMLScene`` (so ``slicer.util.addVolumeFromArray`` and the
  like work on real nodes);
- ``slicer.ScriptedLoadableModule``: the four base classes. Module, Logic and Test follow the
  app's own (pure Python) implementations minus their Qt parts: ``Test.delayDisplay`` prints,
  ``Test.setUp`` does nothing, ``Logic.getParameterNode`` uses the real scene. The Widget base
  class refuses to be instantiated: a widget needs Qt and the real app.

It fakes no MRML behaviour and no result. Usage::

    import slicer_app_shim
    scene = slicer_app_shim.install()        # a fresh real scene as slicer.mrmlScene
    from SelfSupervisedSPECT import SelfSupervisedSPECTTest   # the module file imports cleanly
    ...
    slicer_app_shim.uninstall()
"""
from __future__ import annotations

import importlib
import logging
import sys
import types
import unittest

import slicer

__all__ = ["install", "uninstall", "is_real_app"]

_MODULE_NAME = "slicer.ScriptedLoadableModule"
_installed_by_us = False


def is_real_app() -> bool:
    """True inside the real Slicer application (then install() changes nothing)."""
    return hasattr(slicer, "app")


class ScriptedLoadableModule:
    """Base of a module's description class (title, categories, help), as in the app minus the icon."""

    def __init__(self, parent=None):
        super().__init__()
        self.parent = parent if parent is not None else types.SimpleNamespace(path="")
        self.moduleName = self.__class__.__name__
        self.parent.title = ""
        self.parent.categories = []
        self.parent.dependencies = []
        self.parent.contributors = []
        self.parent.helpText = ""
        self.parent.acknowledgementText = ""
        if not hasattr(slicer, "selfTests"):
            slicer.selfTests = {}
        slicer.selfTests[self.moduleName] = self.runTest

    def runTest(self, msec=100, **kwargs):
        module = importlib.import_module(self.__module__)
        class_name = self.moduleName + "Test"
        try:
            test_case_class = getattr(module, class_name)
        except AttributeError:
            raise AssertionError(f"Test case class not found: {self.__module__}.{class_name} ")
        test_case = test_case_class()
        test_case.messageDelay = msec
        test_case.runTest(**kwargs)


class ScriptedLoadableModuleWidget:
    """A module panel needs Qt and the real Slicer app; headless it cannot be created."""

    def __init__(self, parent=None):
        raise RuntimeError("A module widget needs the real 3D Slicer application (Qt); "
                           "headless tests use the Logic and Test classes only.")


class ScriptedLoadableModuleLogic:
    """Base of a module's logic; parameter nodes are real vtkMRMLScriptedModuleNodes in the scene."""

    def __init__(self, parent=None):
        super().__init__()
        self.moduleName = self.__class__.__name__
        if self.moduleName.endswith("Logic"):
            self.moduleName = self.moduleName[:-5]
        self.isSingletonParameterNode = True

    def getParameterNode(self):
        if self.isSingletonParameterNode:
            node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node:
                if node.GetAttribute("ModuleName") != self.moduleName:
                    node.SetAttribute("ModuleName", self.moduleName)
                return node
        else:
            for node in self.getAllParameterNodes():
                return node
        return slicer.mrmlScene.AddNode(self.createParameterNode())

    def getAllParameterNodes(self):
        found = []
        for index in range(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode")):
            node = slicer.mrmlScene.GetNthNodeByClass(index, "vtkMRMLScriptedModuleNode")
            if node.GetAttribute("ModuleName") == self.moduleName:
                found.append(node)
        return found

    def createParameterNode(self):
        node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
        node.UnRegister(None)
        if self.isSingletonParameterNode:
            node.SetSingletonTag(self.moduleName)
        node.SetAttribute("ModuleName", self.moduleName)
        node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
        return node


class ScriptedLoadableModuleTest(unittest.TestCase):
    """Base of a module's self-test; messages go to stdout instead of a dialog."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.enableScreenshots = False
        self.screenshotScaleFactor = 1.0

    def setUp(self):
        pass

    def delayDisplay(self, message, requestedDelay=None, msec=None):
        print(message)

    def takeScreenshot(self, name, description, type=-1):
        self.delayDisplay(description)

    def runTest(self):
        logging.warning("No test is defined in " + self.__class__.__name__)


def _module() -> types.ModuleType:
    module = types.ModuleType(_MODULE_NAME, "Headless stand-in for the app's ScriptedLoadableModule (see slicer_app_shim).")
    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic, ScriptedLoadableModuleTest):
        setattr(module, cls.__name__, cls)
    module.__all__ = ["ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
                      "ScriptedLoadableModuleTest"]
    return module


def install(scene=None):
    """Install the base classes (once) and a real scene as ``slicer.mrmlScene``; returns the scene.

    A new ``vtkMRMLScene`` is made unless ``scene`` is given. In the real app nothing is changed
    and the app's scene is returned.
    """
    global _installed_by_us
    if is_real_app():
        return slicer.mrmlScene
    if _MODULE_NAME not in sys.modules:
        sys.modules[_MODULE_NAME] = _module()
        _installed_by_us = True
    slicer.ScriptedLoadableModule = sys.modules[_MODULE_NAME]
    slicer.mrmlScene = scene if scene is not None else slicer.vtkMRMLScene()
    return slicer.mrmlScene


def uninstall() -> None:
    """Remove what install() added (the scene is cleared and detached)."""
    global _installed_by_us
    if is_real_app():
        return
    scene = getattr(slicer, "mrmlScene", None)
    if scene is not None:
        scene.Clear(True)
        del slicer.mrmlScene
    if _installed_by_us:
        sys.modules.pop(_MODULE_NAME, None)
        if hasattr(slicer, "ScriptedLoadableModule"):
            del slicer.ScriptedLoadableModule
        _installed_by_us = False
