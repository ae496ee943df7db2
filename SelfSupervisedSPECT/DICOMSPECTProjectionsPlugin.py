"""DICOM plugin: offers NM TOMO projection series (SPECT raw data) in Slicer's DICOM browser.

Real Slicer app only (DICOMLib is imported at file scope). Every top-level .py file of a
scripted-module folder is loaded by Slicer as a module, so this file also holds the hidden module
class that Slicer's module factory looks for (`DICOMSPECTProjectionsPlugin`, named after the
file). As in Slicer's own DICOM plugins, that class registers the plugin in
slicer.modules.dicomPlugins when Slicer instantiates it, while the modules load: before the DICOM
module builds its plugin list, even when DICOM is the home module.
"""
import logging
import os

import slicer
from DICOMLib import DICOMLoadable, DICOMPlugin

NM_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.20"
TAGS = {
    "sopClassUID": "0008,0016",
    "modality": "0008,0060",
    "imageType": "0008,0008",
    "seriesDescription": "0008,103E",
    "seriesNumber": "0020,0011",
    "seriesInstanceUID": "0020,000E",
    "instanceUID": "0008,0018",
    "numberOfFrames": "0028,0008",
}


def isProjectionHeader(sopClassUID, modality, imageType):
    """NM Image Storage (or modality NM) whose ImageType holds TOMO and not RECON."""
    kinds = {part.strip().upper() for part in (imageType or "").split("\\")}
    isNM = sopClassUID == NM_IMAGE_STORAGE or (modality or "").upper() == "NM"
    return isNM and "TOMO" in kinds and "RECON" not in kinds


def describeWindows(path):
    """'187.2-228.8 keV (Lu177_EM), ...' from the file's energy window sequence ('' if unreadable)."""
    try:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # the tooltip is a courtesy; examine() must not fail for it
        return ""
    parts = []
    for item in ds.get("EnergyWindowInformationSequence") or []:
        ranges = item.get("EnergyWindowRangeSequence") or []
        if not ranges:
            continue
        lower = float(ranges[0].get("EnergyWindowLowerLimit", 0) or 0)
        upper = float(ranges[0].get("EnergyWindowUpperLimit", 0) or 0)
        name = str(item.get("EnergyWindowName") or "").strip()
        parts.append(f"{lower:g}-{upper:g} keV" + (f" ({name})" if name else ""))
    views = ds.get("NumberOfFramesInRotation") or ""
    text = "energy windows: " + ", ".join(parts) if parts else "no energy window information"
    return text + (f"; {views} views per rotation" if views else "")


class DICOMSPECTProjectionsPluginClass(DICOMPlugin):
    """NM TOMO projections -> a projection volume node that the SelfSupervisedSPECT module reconstructs."""

    def __init__(self):
        super().__init__()
        self.loadType = "SPECT projections (SelfSupervisedSPECT)"
        self.tags.update(TAGS)

    def examineForImport(self, fileLists):
        loadables = []
        for files in fileLists:
            cached = self.getCachedLoadables(files)
            if cached is not None:
                loadables += cached
                continue
            found = self.examineFiles(files)
            self.cacheLoadables(files, found)
            loadables += found
        return loadables

    def examine(self, fileLists):
        return self.examineForImport(fileLists)

    def examineFiles(self, files):
        database = slicer.dicomDatabase
        projectionFiles = [path for path in files
                           if isProjectionHeader(database.fileValue(path, TAGS["sopClassUID"]),
                                                 database.fileValue(path, TAGS["modality"]),
                                                 database.fileValue(path, TAGS["imageType"]))]
        if not projectionFiles:
            return []
        loadable = DICOMLoadable()
        loadable.files = projectionFiles
        description = database.fileValue(projectionFiles[0], TAGS["seriesDescription"]) or "SPECT projections"
        number = database.fileValue(projectionFiles[0], TAGS["seriesNumber"])
        loadable.name = f"{number}: {description}" if number else description
        windows = describeWindows(projectionFiles[0])
        loadable.tooltip = (f"NM TOMO projections, {len(projectionFiles)} file(s)" + (f"; {windows}" if windows else "")
                            + ". Reconstruct them in the SelfSupervisedSPECT module.")
        loadable.selected = True
        loadable.confidence = 0.95  # above the scalar-volume plugin, which would show raw frames only
        return [loadable]

    def load(self, loadable):
        from SelfSupervisedSPECT import SelfSupervisedSPECTLogic
        from SelfSupervisedSPECTLib import DoorError

        try:
            node = SelfSupervisedSPECTLogic().load_projection_series(list(loadable.files), name=loadable.name)
        except DoorError as error:
            logging.error(str(error))
            slicer.util.errorDisplay(str(error), windowTitle="SPECT projections")
            return None
        uids = [slicer.dicomDatabase.fileValue(path, TAGS["instanceUID"]) or "Unknown" for path in loadable.files]
        node.SetAttribute("DICOM.instanceUIDs", " ".join(uids))
        try:
            self.addSeriesInSubjectHierarchy(loadable, node)
        except Exception:  # the node is loaded; a hierarchy hiccup must not lose it
            logging.exception("Could not place %s in the subject hierarchy", os.path.basename(loadable.files[0]))
        return node


class DICOMSPECTProjectionsPlugin:
    """Hidden module shell that Slicer's scripted-module factory expects for this file; creating
    it registers the plugin with the DICOM module."""

    def __init__(self, parent):
        parent.title = "DICOM SPECT Projections Plugin"
        parent.categories = ["Developer Tools.DICOM Plugins"]
        parent.contributors = ["The SelfSupervisedSPECT developers"]
        parent.helpText = "Loads NM TOMO projection series for the SelfSupervisedSPECT module."
        parent.acknowledgementText = "Part of the SelfSupervisedSPECT extension."
        parent.hidden = True
        self.parent = parent
        # This module may be instantiated before the DICOM module: create the plugin list if needed.
        try:
            slicer.modules.dicomPlugins
        except AttributeError:
            slicer.modules.dicomPlugins = {}
        slicer.modules.dicomPlugins["DICOMSPECTProjectionsPlugin"] = DICOMSPECTProjectionsPluginClass
