"""A fast SPECT operator: PyTomography's rotate + attenuate + blur + sum model, precomputed.

PyTomography 3.4's ``SPECTSystemMatrix`` rebuilds the same numbers for every view of every
projection: it pads and rotates the object with kornia, rotates the mu map again and takes
``exp(-cumsum)``, and blurs every plane parallel to the detector with its own 1D Gaussian
convolutions. :class:`SPECTOperator` keeps that model (same object and projection layout, same
``270 - angle`` rotation and bilinear weights, same attenuation factors, same depth-dependent
Gaussian from the same PSF metadata, per-view radii) and computes once what does not change:

- rotation: the bilinear taps of every view as index and weight tables, applied as a weighted
  gather (``embedding_bag``); the back projection is the same gather over PyTomography's
  back-rotation taps (``backward``, matched as PyTomography's) or over the inverted forward
  tables (``transpose``, the exact ``A^T`` that learned methods' gradients need);
- attenuation: the detection probability of every view, kept when it fits the memory limit and
  otherwise recomputed per group of views;
- collimator-detector response: depth-dependent blur by incremental diffusion (see
  :meth:`SPECTOperator._psf_tables`).

The views of a group run together (one batched operation per depth plane), on the CPU or the
GPU with the same code. PyTomography's algorithms accept it as their ``SystemMatrix``.
"""
from __future__ import annotations

import copy
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from pytomography.projectors import SystemMatrix
from pytomography.utils import compute_pad_size, get_distance

DEFAULT_PRECOMPUTE_LIMIT_BYTES = 4 * 1024**3  # attenuation factors above this are recomputed per group of views
PRECOMPUTE_SHARE = 0.25  # and above this share of the memory free when the operator is built
# working memory of one group of views in the back projection: on the CPU larger groups gain nothing
# (they leave the caches); on a GPU one group of all views means fewer kernel launches
GROUP_BYTES = {"cpu": 256 * 1024**2, "gpu": 4 * 1024**3}
DEFAULT_PSF_KURTOSIS = 0.1  # largest excess kurtosis of a plane's blur kernel against a Gaussian (see _psf_tables)
BACK_PROJECTIONS = ("matched", "exact")  # what ``backward`` computes (see SPECTOperator.backward)
MAX_STEP_VARIANCE = 0.5  # px^2 per diffusion step: keeps the 3-tap kernel [a, 1-2a, a] positive and Gaussian-like


def _rotation_taps(angle_deg: float, padded: int, rows: slice, cols: slice, source_rows: slice, source_cols: slice):
    """Bilinear taps of kornia's ``rotate(., angle)`` on the padded grid, for the output pixels ``rows`` x ``cols``.

    kornia rotates counter-clockwise about ``((W-1)/2, (H-1)/2)`` with ``align_corners=True`` and
    zero padding: an output pixel (row, col) samples the input at ``R^T ((col, row) - c) + c``.
    Only the input region ``source_rows`` x ``source_cols`` can be nonzero: indices are into that
    region, row-major, and taps outside it get weight 0 (and a harmless index 0).
    """
    theta = math.radians(angle_deg)
    cos, sin = math.cos(theta), math.sin(theta)
    centre = (padded - 1) / 2
    row, col = torch.meshgrid(torch.arange(rows.start, rows.stop, dtype=torch.float64),
                              torch.arange(cols.start, cols.stop, dtype=torch.float64), indexing="ij")
    source_col = centre + cos * (col - centre) - sin * (row - centre) - source_cols.start
    source_row = centre + sin * (col - centre) + cos * (row - centre) - source_rows.start
    height, width = source_rows.stop - source_rows.start, source_cols.stop - source_cols.start
    row0, col0 = source_row.floor(), source_col.floor()
    frac_row, frac_col = source_row - row0, source_col - col0
    indices, weights = [], []
    for d_row, d_col, weight in ((0, 0, (1 - frac_row) * (1 - frac_col)), (0, 1, (1 - frac_row) * frac_col),
                                 (1, 0, frac_row * (1 - frac_col)), (1, 1, frac_row * frac_col)):
        r, c = row0 + d_row, col0 + d_col
        inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
        indices.append(torch.where(inside, r * width + c, 0).long())
        weights.append(torch.where(inside, weight, 0.0).float())
    return torch.stack(indices, -1), torch.stack(weights, -1)  # [rows, cols, 4]


def _transpose_taps(indices: torch.Tensor, weights: torch.Tensor, n_sources: int):
    """Invert one view's tap tables: for every object pixel, the output pixels that read it.

    Returns [n_sources, T] rows and weights (T the largest count, padded with weight 0), so that
    the transpose of the gather is again a gather.
    """
    sources = indices.reshape(-1)
    outputs = torch.arange(indices.shape[0], device=indices.device).repeat_interleave(indices.shape[1])
    values = weights.reshape(-1)
    keep = values != 0
    sources, outputs, values = sources[keep], outputs[keep], values[keep]
    order = torch.argsort(sources, stable=True)
    sources, outputs, values = sources[order], outputs[order], values[order]
    counts = torch.bincount(sources, minlength=n_sources)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(sources.numel(), device=sources.device) - starts[sources]
    width = max(int(counts.max()) if counts.numel() else 1, 1)
    rows = torch.zeros(n_sources, width, dtype=torch.long, device=indices.device)
    taps = torch.zeros(n_sources, width, dtype=weights.dtype, device=indices.device)
    rows[sources, slot] = outputs
    taps[sources, slot] = values
    return rows, taps


def _free_bytes(device: torch.device) -> int | None:
    """Memory free now on ``device`` (None where the platform does not say)."""
    if device.type != "cpu":
        return torch.cuda.mem_get_info(device)[0] if torch.cuda.is_available() else None
    try:  # Linux: what can be had without swapping, page cache included
        with open("/proc/meminfo") as meminfo:
            return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        pass
    try:  # macOS and other Unix: free pages
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # Windows has no sysconf
        return None


def _gaussian_kernel(sigma_px: np.ndarray, size: int) -> np.ndarray:
    """PyTomography's sampled, normalised Gaussian (``get_1D_PSF_layer_gaussian``), one row per sigma."""
    x = np.arange(-(size // 2), size // 2 + 1, dtype=np.float64)
    kernel = np.exp(-x[None, :] ** 2 / (2 * sigma_px[:, None] ** 2 + 1e-11))
    return kernel / kernel.sum(axis=1, keepdims=True)


class SPECTOperator(SystemMatrix):
    """SPECT system matrix ``A``: objects [..., Lx, Ly, Lz] -> projections [..., Ltheta, Lr, Lz].

    ``forward``, ``backward`` and ``transpose`` take one object or a batch with any leading
    dimensions (a network's [B, C, X, Y, Z]) and all views or one subset (``set_n_subsets``);
    ``transpose`` is the exact transpose of ``forward``, ``backward`` PyTomography's matched one.
    Build it with :func:`sspect.physics.system.build_problem` or directly from PyTomography's
    metadata, the mu map and the PSF metadata.
    """

    def __init__(self, object_meta, proj_meta, attenuation_map: torch.Tensor | None = None, psf_meta=None,
                 device: torch.device | str = "cpu", precompute_limit_bytes: int = DEFAULT_PRECOMPUTE_LIMIT_BYTES,
                 group_bytes: int | None = None, psf_kurtosis: float = DEFAULT_PSF_KURTOSIS,
                 back_projection: str = "matched"):
        super().__init__(object_meta, proj_meta)
        if back_projection not in BACK_PROJECTIONS:
            raise ValueError(f"back_projection must be one of {BACK_PROJECTIONS}, not {back_projection!r}")
        self.back_projection = back_projection
        shape = tuple(int(s) for s in object_meta.shape)
        if shape[0] != shape[1] or tuple(proj_meta.shape[1:]) != (shape[0], shape[2]):
            raise ValueError(f"The operator needs square axial planes matching the detector; got object {shape}, "
                             f"projections {tuple(proj_meta.shape)}.")
        self.device = torch.device(device)
        self.size, self.depth = shape[0], shape[2]
        self.pad = compute_pad_size(self.size)
        self.padded = self.size + 2 * self.pad
        self.angles = [float(a) for a in torch.as_tensor(proj_meta.angles).cpu()]
        self.radii = np.asarray(proj_meta.radii, dtype=np.float64).reshape(-1)
        if self.radii.size == 1:
            self.radii = np.full(len(self.angles), float(self.radii[0]))
        self.num_views = len(self.angles)
        self.group_bytes = group_bytes or GROUP_BYTES["cpu" if self.device.type == "cpu" else "gpu"]
        self._psf_tables(psf_meta, psf_kurtosis)
        window = slice(max(0, self.pad - self.margin), min(self.padded, self.pad + self.size + self.margin))
        self.window = window
        self.width = window.stop - window.start
        self.crop = self.pad - window.start  # where the detector's Lr bins start inside the window
        self._rotation_tables()
        self.attenuation = None if attenuation_map is None else attenuation_map.to(self.device, torch.float32)
        self.detection = None  # [X, V, Yw, Z] detection probabilities, when they fit
        self.precomputed_bytes = self._table_bytes()
        if self.attenuation is not None:
            detection_bytes = self.padded * self.num_views * self.width * self.depth * 4
            free = _free_bytes(self.device)
            if detection_bytes <= min(precompute_limit_bytes, PRECOMPUTE_SHARE * free if free else math.inf):
                try:
                    self.detection = self._detection(torch.arange(self.num_views, device=self.device))
                    self.precomputed_bytes += detection_bytes
                except (MemoryError, torch.OutOfMemoryError):
                    self.detection = None
        self._buffer = None
        self.set_n_subsets(1)

    # ------------------------------------------------------------------ precomputation
    def _rotation_tables(self):
        """Forward taps (rotated frame <- object), their exact transpose, and PyTomography's back-rotation taps."""
        padded, obj = slice(0, self.padded), slice(self.pad, self.pad + self.size)
        forward_index, forward_weight, exact_rows, exact_weight, matched_rows, matched_weight = [], [], [], [], [], []
        for angle in self.angles:
            index, weight = _rotation_taps(angle - 270.0, self.padded, padded, self.window, obj, obj)
            forward_index.append(index)
            forward_weight.append(weight)
            rows, taps = _transpose_taps(index.reshape(-1, 4), weight.reshape(-1, 4), self.size**2)
            exact_rows.append(rows)
            exact_weight.append(taps)
            rows, taps = _rotation_taps(270.0 - angle, self.padded, obj, obj, padded, self.window)
            matched_rows.append(rows.reshape(-1, 4))
            matched_weight.append(taps.reshape(-1, 4))
        width = max(r.shape[1] for r in exact_rows)
        self.forward_index = torch.stack(forward_index, 1).to(self.device)  # [X, V, Yw, 4]
        self.forward_weight = torch.stack(forward_weight, 1).to(self.device)
        self.back_taps = {  # [V, L^2, T]: for every object pixel, the rotated-frame pixels it reads
            "exact": (torch.stack([F.pad(r, (0, width - r.shape[1])) for r in exact_rows]).to(self.device),
                      torch.stack([F.pad(w, (0, width - w.shape[1])) for w in exact_weight]).to(self.device)),
            "matched": (torch.stack(matched_rows).to(self.device), torch.stack(matched_weight).to(self.device))}

    def _psf_tables(self, psf_meta, group_kurtosis: float):
        """Depth-dependent Gaussian blur by groups of depth planes, with small diffusion steps inside a group.

        PyTomography blurs plane ``x`` (``x = 0`` farthest from the detector) with its own sampled
        Gaussian of variance ``v_x``, then sums over ``x``. Here the planes of a group are summed
        from the far side with a 3-tap diffusion step ``[a, 1-2a, a]`` (variance ``2a = v_{x-1} -
        v_x``) between them, and each group's sum gets the PyTomography kernel of its nearest plane
        ``e``: every plane is blurred by exactly its kernel's variance. Only the shape differs: the
        steps add a 4th cumulant ``v_x - v_e``, an excess kurtosis ``(v_x - v_e) / v_x^2`` that a
        group keeps below ``group_kurtosis`` (near planes, narrow kernels, make small groups; far
        planes large ones). The cost per voxel is 9 multiply-adds per step plus 2 x 23 (4.4 mm,
        MEGP) per group, against 2 x 23 per plane. The error against PyTomography for each bound
        is measured by ``benchmarks/psf_groups.py`` (``docs/operator/``).
        """
        planes, views = self.padded, self.num_views
        self.steps = np.zeros(planes, dtype=int)
        self.step_weights = torch.zeros(planes, views, 1, 3, 3)
        self.step_weights[:, :, 0, 1, 1] = 1.0
        self.group_last = np.zeros(planes, dtype=bool)
        self.group_last[-1] = True
        self.base_y = torch.ones(planes, views, 1, 1, 1)
        self.base_z = torch.ones(planes, views, 1, 1, 1)
        self.margin, self.z_pad = 2, 0
        if psf_meta is not None:
            if psf_meta.shape != "gaussian":
                raise ValueError(f"The fast operator models Gaussian collimator responses, not {psf_meta.shape!r}.")
            spacing_y, spacing_z = float(self.object_meta.dx), float(self.object_meta.dz)
            blur_z = psf_meta.kernel_dimensions == "2D"
            sigma = np.stack([psf_meta.sigma_fit(get_distance(planes, radius, spacing_y), *psf_meta.sigma_fit_params)
                              for radius in self.radii], axis=1)  # [X, V] in cm
            variances, kernels = [], []
            for spacing, active in ((spacing_y, True), (spacing_z, blur_z)):
                sigma_px = sigma / spacing
                sizes = [int(np.ceil(sigma_px[:, v].max() * psf_meta.min_sigmas) * 2 + 1) for v in range(views)]
                size = max(sizes) if active else 1
                variance = np.zeros((planes, views))
                kernel = np.zeros((planes, views, size))
                kernel[:, :, size // 2] = 1.0
                if active:
                    for v in range(views):
                        sampled = _gaussian_kernel(sigma_px[:, v], sizes[v])
                        offsets = np.arange(-(sizes[v] // 2), sizes[v] // 2 + 1)
                        variance[:, v] = (sampled * offsets**2).sum(axis=1)
                        shift = (size - sizes[v]) // 2
                        kernel[:, v, :] = 0.0
                        kernel[:, v, shift:shift + sizes[v]] = sampled
                variances.append(variance)
                kernels.append(kernel)
            start = 0
            for x in range(1, planes):
                # excess kurtosis of the kernels of planes start..x if x closed the group (the 3-tap steps' 4th cumulant)
                spanned = [((v[start:x + 1] - v[x]) / np.maximum(v[start:x + 1], 1e-12) ** 2).max(axis=0) for v in variances]
                if (np.maximum(*spanned) > group_kurtosis).any():
                    self.group_last[x - 1] = True
                    start = x
                    continue
                increment_y = np.clip(variances[0][x - 1] - variances[0][x], 0.0, None)
                increment_z = np.clip(variances[1][x - 1] - variances[1][x], 0.0, None)
                self.steps[x] = int(np.ceil(max(increment_y.max(), increment_z.max()) / MAX_STEP_VARIANCE - 1e-9))
                if self.steps[x]:
                    a_y = torch.as_tensor(increment_y / (2 * self.steps[x]), dtype=torch.float32)
                    a_z = torch.as_tensor(increment_z / (2 * self.steps[x]), dtype=torch.float32)
                    tap_y = torch.stack([a_y, 1 - 2 * a_y, a_y], -1)  # [V, 3]
                    tap_z = torch.stack([a_z, 1 - 2 * a_z, a_z], -1)
                    self.step_weights[x] = (tap_y[:, :, None] * tap_z[:, None, :]).unsqueeze(1)
            self.base_y = torch.as_tensor(kernels[0], dtype=torch.float32).reshape(planes, views, 1, -1, 1)
            self.base_z = torch.as_tensor(kernels[1], dtype=torch.float32).reshape(planes, views, 1, 1, -1)
            self.margin = self.base_y.shape[3] // 2 + 2
            self.z_pad = self.base_z.shape[4] // 2 + 2 if blur_z else 0
        last = torch.as_tensor(self.group_last)
        self.base_y, self.base_z = self.base_y[last].to(self.device), self.base_z[last].to(self.device)  # [G, V, 1, ., .]
        self.group_index = np.cumsum(self.group_last) - self.group_last  # group of each plane
        self.step_weights = self.step_weights.to(self.device)

    def _detection(self, views: torch.Tensor) -> torch.Tensor:
        """PyTomography's ``exp(-rev_cumsum(mu dx))`` of the rotated mu map, for ``views``: [X, Vg, Yw, Z].

        The reverse cumulative sum runs plane by plane from the detector side (``torch.cumsum``
        along the outer dimension is several times slower on the CPU).
        """
        mu = self.attenuation.reshape(self.size**2, self.depth) * float(self.object_meta.dx)
        n = len(views)
        detection = torch.empty(self.padded, n, self.width, self.depth, device=self.device)
        index, weight = self.forward_index.index_select(1, views), self.forward_weight.index_select(1, views)
        through = torch.zeros(n * self.width, self.depth, device=self.device)
        for x in range(self.padded - 1, -1, -1):
            rotated = F.embedding_bag(index[x].reshape(-1, 4), mu, per_sample_weights=weight[x].reshape(-1, 4), mode="sum")
            through += rotated
            torch.exp(rotated * 0.5 - through, out=detection[x].view(n * self.width, self.depth))
        return detection

    def _table_bytes(self) -> int:
        tensors = (self.forward_index, self.forward_weight, *self.back_taps["exact"], *self.back_taps["matched"],
                   self.step_weights, self.base_y, self.base_z)
        return sum(t.numel() * t.element_size() for t in tensors)

    # ------------------------------------------------------------------ subsets (as PyTomography's SPECTSystemMatrix)
    def set_n_subsets(self, n_subsets: int) -> None:
        views = torch.arange(self.num_views, device=self.device)
        self.subset_indices_array = [views[i::n_subsets] for i in range(n_subsets)]

    def get_projection_subset(self, projections: torch.Tensor, subset_idx: int) -> torch.Tensor:
        return projections[..., self.subset_indices_array[subset_idx].to(projections.device), :, :]

    def get_weighting_subset(self, subset_idx: int | None) -> float:
        if subset_idx is None:
            return 1
        return len(self.subset_indices_array[subset_idx]) / self.num_views

    def compute_normalization_factor(self, subset_idx: int | None = None) -> torch.Tensor:
        views = self._views(subset_idx)
        return self.backward(torch.ones(len(views), self.size, self.depth, device=self.device), subset_idx)

    def _views(self, subset_idx):
        if subset_idx is None:
            return torch.arange(self.num_views, device=self.device)
        return self.subset_indices_array[subset_idx]

    def _groups(self, views: torch.Tensor, batch: int):
        """Views in groups whose back-projection buffer fits ``group_bytes``."""
        per_view = self.padded * self.width * batch * (self.depth + 2 * self.z_pad) * 4
        size = max(1, min(len(views), self.group_bytes // max(per_view, 1)))
        return [(start, views[start:start + size]) for start in range(0, len(views), size)]

    def _group_detection(self, views: torch.Tensor):
        """The group's detection probabilities when they are not kept (else read plane by plane)."""
        if self.attenuation is None or self.detection is not None:
            return None
        return self._detection(views)

    def _detection_plane(self, x: int, views: torch.Tensor, group_detection):
        if self.attenuation is None:
            return None
        if group_detection is not None:
            return group_detection[x]
        return self.detection[x].index_select(0, views)

    def _workspace(self, shape: tuple) -> torch.Tensor:
        """The back projection's plane buffer, kept between calls: a fresh one costs a page fault per 4 kB."""
        if self._buffer is None or self._buffer.numel() < math.prod(shape):
            self._buffer = None
            self._buffer = torch.empty(math.prod(shape), device=self.device)
        return self._buffer[:math.prod(shape)].view(shape)

    def _canvas(self, batch: int, views: int) -> torch.Tensor:
        """A zero detector-plane stack [batch, views, Yw, Z + 2 z_pad]; channels-last (views innermost)
        makes the grouped convolutions about ten times faster on the CPU."""
        return torch.zeros(batch, views, self.width, self.depth + 2 * self.z_pad,
                           device=self.device).contiguous(memory_format=torch.channels_last)

    def _diffuse(self, image: torch.Tensor, x: int, views: torch.Tensor) -> torch.Tensor:
        weight = self.step_weights[x].index_select(0, views)
        for _ in range(int(self.steps[x])):
            image = F.conv2d(image, weight, padding=1, groups=len(views))
        return image

    def _group_blur(self, image: torch.Tensor, x: int, views: torch.Tensor) -> torch.Tensor:
        """The PyTomography kernel of plane ``x``, the nearest plane of its group, for every view in ``views``."""
        groups = len(views)
        group = int(self.group_index[x])
        weight_y, weight_z = self.base_y[group].index_select(0, views), self.base_z[group].index_select(0, views)
        image = F.conv2d(image, weight_y, padding=(weight_y.shape[2] // 2, 0), groups=groups)
        return F.conv2d(image, weight_z, padding=(0, weight_z.shape[3] // 2), groups=groups)

    # ------------------------------------------------------------------ the operator
    @torch.no_grad()
    def forward(self, object: torch.Tensor, subset_idx: int | None = None) -> torch.Tensor:
        """``A x``: [..., Lx, Ly, Lz] -> [..., Ltheta(subset), Lr, Lz]."""
        lead = object.shape[:-3]
        batch = int(np.prod(lead)) if lead else 1
        flat = object.to(self.device, torch.float32).reshape(batch, self.size**2, self.depth)
        source = flat.permute(1, 0, 2).reshape(self.size**2, batch * self.depth)
        views = self._views(subset_idx)
        out = torch.empty(batch, len(views), self.size, self.depth, device=self.device)
        depth = slice(self.z_pad, self.z_pad + self.depth)
        for start, group in self._groups(views, batch):
            n = len(group)
            detection = self._group_detection(group)
            index = self.forward_index.index_select(1, group)
            weight = self.forward_weight.index_select(1, group)
            total = self._canvas(batch, n)
            result = None
            for x in range(self.padded):
                if self.steps[x]:
                    total = self._diffuse(total, x, group)
                plane = F.embedding_bag(index[x].reshape(-1, 4), source, per_sample_weights=weight[x].reshape(-1, 4),
                                        mode="sum").reshape(n, self.width, batch, self.depth)
                factor = self._detection_plane(x, group, detection)
                if factor is None:
                    total[..., depth] += plane.permute(2, 0, 1, 3)
                else:
                    total[..., depth].addcmul_(plane.permute(2, 0, 1, 3), factor)
                if self.group_last[x]:
                    blurred = self._group_blur(total, x, group)
                    result = blurred if result is None else result.add_(blurred)
                    total = self._canvas(batch, n)
            out[:, start:start + n] = result[:, :, self.crop:self.crop + self.size, depth]
        return out.reshape(*lead, len(views), self.size, self.depth)

    def backward(self, proj: torch.Tensor, subset_idx: int | None = None) -> torch.Tensor:
        """The back projection PyTomography's algorithms call: [..., Ltheta(subset), Lr, Lz] -> [..., Lx, Ly, Lz].

        By default (``back_projection="matched"``) PyTomography's own, matched but not transposed:
        the stack of planes is rotated back by bilinear interpolation at the opposite angle, and
        bilinear rotation by -a is not the transpose of bilinear rotation by a. Kept so that OSEM,
        BSREM and the other algorithms converge to the images they give with PyTomography's
        projector (the real bed's OSEM 4 x 6 with ``"exact"`` differs from PyTomography's several
        times more, measured in ``benchmarks/operator_speed.py``); :meth:`transpose` is the exact
        ``A^T`` whatever this choice.
        """
        return self._back_project(proj, subset_idx, self.back_projection)

    def transpose(self, proj: torch.Tensor, subset_idx: int | None = None) -> torch.Tensor:
        """``A^T g``, the exact transpose of :meth:`forward` (gradients of learned methods)."""
        return self._back_project(proj, subset_idx, "exact")

    @torch.no_grad()
    def _back_project(self, proj: torch.Tensor, subset_idx: int | None, rotation: str) -> torch.Tensor:
        lead = proj.shape[:-3]
        batch = int(np.prod(lead)) if lead else 1
        views = self._views(subset_idx)
        flat = proj.to(self.device, torch.float32).reshape(batch, len(views), self.size, self.depth)
        image = torch.zeros(self.size**2, batch * self.depth, device=self.device)
        depth = slice(self.z_pad, self.z_pad + self.depth)
        for start, group in self._groups(views, batch):
            n = len(group)
            detection = self._group_detection(group)
            measured = self._canvas(batch, n)
            measured[:, :, self.crop:self.crop + self.size, depth] = flat[:, start:start + n]
            planes = self._workspace((n, self.padded, self.width, batch, self.depth))
            for x in range(self.padded - 1, -1, -1):
                if self.group_last[x]:
                    spread = self._group_blur(measured, x, group)
                factor = self._detection_plane(x, group, detection)
                destination = planes[:, x].permute(2, 0, 1, 3)  # [batch, n, Yw, Z] view of the buffer
                plane = spread[..., depth].contiguous()  # views outermost, as in the buffer (one fast transpose)
                if factor is None:
                    destination.copy_(plane)
                else:
                    torch.mul(plane, factor, out=destination)
                if self.steps[x]:
                    spread = self._diffuse(spread, x, group)
            rows, taps = (table.index_select(0, group) for table in self.back_taps[rotation])
            rows = rows + (torch.arange(n, device=self.device) * self.padded * self.width).reshape(n, 1, 1)
            image += F.embedding_bag(rows.permute(1, 0, 2).reshape(self.size**2, -1),
                                     planes.reshape(n * self.padded * self.width, batch * self.depth),
                                     per_sample_weights=taps.permute(1, 0, 2).reshape(self.size**2, -1), mode="sum")
        image = image.reshape(self.size, self.size, batch, self.depth).permute(2, 0, 1, 3)
        return image.reshape(*lead, self.size, self.size, self.depth)

    def select_views(self, views) -> "SPECTOperator":
        """The same operator restricted to ``views`` (indices into this one's views), its tables cut to them.

        Noise2Inverse reconstructs subsets of the views on their own; OSEM's subsets cannot describe
        the complement of a subset.
        """
        from pytomography.metadata.SPECT import SPECTProjMeta

        chosen_views = np.asarray(views, dtype=np.int64)
        index = torch.as_tensor(chosen_views, device=self.device)
        chosen = copy.copy(self)
        chosen.angles = [self.angles[i] for i in chosen_views]
        chosen.radii = self.radii[chosen_views]
        chosen.proj_meta = SPECTProjMeta(self.proj_meta.shape[1:], self.proj_meta.dr, np.asarray(chosen.angles), chosen.radii)
        chosen.num_views = len(chosen.angles)
        chosen.forward_index, chosen.forward_weight = self.forward_index[:, index], self.forward_weight[:, index]
        chosen.back_taps = {name: (rows[index], taps[index]) for name, (rows, taps) in self.back_taps.items()}
        chosen.step_weights = self.step_weights[:, index]
        chosen.base_y, chosen.base_z = self.base_y[:, index], self.base_z[:, index]
        chosen.detection = None if self.detection is None else self.detection[:, index]
        chosen._buffer = None
        chosen.set_n_subsets(1)
        return chosen


class Projection(torch.autograd.Function):
    """``y = A x`` with ``dL/dx = A^T dL/dy``: the exact :meth:`SPECTOperator.transpose`, or with
    ``exact=False`` the operator's ``backward`` (PyTomography's matched back projection).

    Call as ``Projection.apply(image, operator, exact)``.
    """

    @staticmethod
    def forward(ctx, image, operator, exact=True):
        ctx.operator, ctx.exact = operator, exact
        return operator.forward(image.detach())

    @staticmethod
    def backward(ctx, grad_projections):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        back = ctx.operator.transpose if ctx.exact else ctx.operator.backward
        return back(grad_projections.detach()).to(grad_projections.dtype), None, None


class BackProjection(torch.autograd.Function):
    """``x = A^T g`` with ``dL/dg = A dL/dx`` (unrolled EM networks back-project a ratio that depends on the image)."""

    @staticmethod
    def forward(ctx, projections, operator):
        ctx.operator = operator
        return operator.transpose(projections.detach())

    @staticmethod
    def backward(ctx, grad_image):
        if not ctx.needs_input_grad[0]:
            return None, None
        return ctx.operator.forward(grad_image.detach()).to(grad_image.dtype), None


class PhotopeakStack(SPECTOperator):
    """Several photopeaks' operators as one: the views of each in turn, ``A = [A_1; A_2; ...]``.

    One image explains every photopeak's projections, each with its own attenuation and collimator
    response, and its counts per unit of activity relative to the first (``sensitivities``: the
    photopeaks' abundances, uncalibrated for the detector's efficiency at each energy)
    (SlicerSPECTRecon's multi-photopeak reconstruction; PyTomography's
    ``ExtendedSystemMatrix`` stacks the same way but has no subsets of views across its parts). A
    subset takes the same subset of each part, so OSEM's subsets see every energy; it is a
    ``SPECTOperator`` so that every method that takes the fast operator takes it unchanged.
    """

    def __init__(self, parts: list[SPECTOperator], sensitivities=None):
        from pytomography.metadata.SPECT import SPECTProjMeta

        SystemMatrix.__init__(self, parts[0].object_meta, SPECTProjMeta(
            parts[0].proj_meta.shape[1:], parts[0].proj_meta.dr, np.concatenate([part.angles for part in parts]),
            np.concatenate([part.radii for part in parts])))
        self.parts = parts
        self.sensitivities = [1.0] * len(parts) if sensitivities is None else [float(s) for s in sensitivities]
        self.device, self.size, self.depth = parts[0].device, parts[0].size, parts[0].depth
        self.angles = [a for part in parts for a in part.angles]
        self.radii = np.concatenate([part.radii for part in parts])
        self.num_views = len(self.angles)
        self.offsets = np.cumsum([0] + [part.num_views for part in parts])
        self.precomputed_bytes = sum(part.precomputed_bytes for part in parts)
        self.set_n_subsets(1)

    def set_n_subsets(self, n_subsets: int) -> None:
        for part in self.parts:
            part.set_n_subsets(n_subsets)
        self.subset_indices_array = [torch.cat([part.subset_indices_array[i] + int(offset)
                                                for part, offset in zip(self.parts, self.offsets)])
                                     for i in range(n_subsets)]

    def _part_views(self, subset_idx):
        """Each part, its sensitivity and the slice of this operator's projections (of subset ``subset_idx``) that are its views."""
        start = 0
        for part, weight in zip(self.parts, self.sensitivities):
            count = len(part._views(subset_idx))
            yield part, weight, slice(start, start + count)
            start += count

    @torch.no_grad()
    def forward(self, object: torch.Tensor, subset_idx: int | None = None) -> torch.Tensor:
        return torch.cat([part.forward(object, subset_idx) * weight for part, weight in zip(self.parts, self.sensitivities)], dim=-3)

    def _back_project(self, proj: torch.Tensor, subset_idx: int | None, rotation: str) -> torch.Tensor:
        image = None
        for part, weight, views in self._part_views(subset_idx):
            back = part._back_project(proj[..., views, :, :] * weight, subset_idx, rotation)
            image = back if image is None else image.add_(back)
        return image

    def backward(self, proj: torch.Tensor, subset_idx: int | None = None) -> torch.Tensor:
        image = None
        for part, weight, views in self._part_views(subset_idx):
            back = part.backward(proj[..., views, :, :] * weight, subset_idx)
            image = back if image is None else image.add_(back)
        return image

    def select_views(self, views) -> "PhotopeakStack | SPECTOperator":
        """The stack restricted to ``views`` (ascending indices into its views), each part cut to its own."""
        chosen = np.asarray(views, dtype=np.int64)
        if np.any(np.diff(chosen) <= 0):
            raise ValueError("select_views of a photopeak stack takes ascending view indices.")
        kept = [(part.select_views(chosen[(chosen >= lo) & (chosen < hi)] - lo), weight)
                for part, weight, lo, hi in zip(self.parts, self.sensitivities, self.offsets[:-1], self.offsets[1:])
                if np.any((chosen >= lo) & (chosen < hi))]
        return PhotopeakStack([part for part, _ in kept], [weight for _, weight in kept])
