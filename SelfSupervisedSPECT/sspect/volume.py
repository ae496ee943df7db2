"""A 3D image with explicit DICOM LPS geometry and a unit.

Array axes are (i, j, k); the world position of voxel centre (i, j, k) in mm (LPS) is
``origin + direction @ (spacing * [i, j, k])``. PyTomography's object arrays are [Lx, Ly, Lz]
with x -> L, y -> P, z -> S, so a reconstruction is a Volume with identity direction.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Volume:
    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    unit: str = "counts"
    uncertainty: np.ndarray | None = None  # voxel standard deviation, same grid and unit, when a method estimates it

    @property
    def affine(self) -> np.ndarray:
        """4x4 matrix from voxel index (i, j, k, 1) to LPS mm."""
        matrix = np.eye(4)
        matrix[:3, :3] = np.asarray(self.direction) @ np.diag(self.spacing)
        matrix[:3, 3] = self.origin
        return matrix

    def index_to_lps(self, index) -> np.ndarray:
        return (self.affine @ np.append(np.asarray(index, dtype=float), 1.0))[:3]

    def lps_to_index(self, point) -> np.ndarray:
        return (np.linalg.inv(self.affine) @ np.append(np.asarray(point, dtype=float), 1.0))[:3]

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0
