"""The Slicer side of SelfSupervisedSPECT, MRML only.

It runs inside the real 3D Slicer app and headless on slicer-core (PyPI). It never imports
torch, pytomography, qt, ctk or the engine (`sspect`): the engine is reached through its door,
a separate process (`PythonSlicer -m sspect run-job JOB.json`) that reads a job file and writes
JSON-lines events.
"""
from .engine import EngineRun, background_process_options
from .errors import DoorError
from .logic import SelfSupervisedSPECTLogicBase

__all__ = ["SelfSupervisedSPECTLogicBase", "EngineRun", "DoorError", "background_process_options"]
