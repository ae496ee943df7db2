"""A seeded anthropomorphic 177Lu patient (24 h after PSMA-617 or DOTATATE) for the harness and training data.

Organs, glands and lesions are analytic solids voxelised with partial volume (:mod:`.geometry`);
each seed is a different patient, the same at every voxel size. Sources and derived values of the
uptake table: docs/simulation.md.
"""
from __future__ import annotations

import math

import numpy as np

from sspect.errors import SSPECTError
from sspect.physics.isotopes import LUTETIUM_177

from .geometry import (DEFAULT_CENTRE_LPS_MM, HU_BONE, HU_LUNG, Grid, Phantom, centred_origin, check_square_grid,
                       ellipsoid, elliptic_prism, even_ceil, paint, region_weights, render, sphere)

TORSO_HOURS_POST_INJECTION = 24.0
TORSO_REFERENCE_MASS_G = 80_000.0  # for SUV-defined concentrations (1 g/mL)

# Height of the field's centre in mm above the reference patient's pubic symphysis. The modelled
# body runs from below the bladder (h ~ 0) to the vertex (h ~ 890 mm).
TORSO_BEDS_MM = {
    "whole_body": 450.0,  # bladder to vertex: needs a field about 1020 mm tall (the default grid)
    "head_thorax": 680.0,  # lacrimal and salivary glands, neck, upper lungs: like bed 1 of the real GE study
    "abdomen": 200.0,  # bladder, pelvis, kidneys, spleen, liver, lung bases: the usual 177Lu dosimetry bed
}
_TORSO_WHOLE_FIELD_MM = (424.0, 1020.0)  # default field: in-plane side, height (h -60 ... 960 mm)

# Uptake about 24 h after the injection. ``fraction_of_injected``: activity physically present in
# the whole organ at the scan (decay included) per injected activity; ``suv``: concentration as
# SUV = C / (injected x decay / 80 kg). Sources and derivation: docs/simulation.md.
TORSO_UPTAKE = {
    "PSMA": {
        "fraction_of_injected": {"kidneys": 0.025, "liver": 0.025, "spleen": 0.0025, "salivary_glands": 0.008,
                                 "lacrimal_glands": 0.0003, "bladder": 0.005},
        "suv": {"body": 0.3, "lungs": 0.1, "bone": 0.3, "brain": 0.03},
        "kidney_cortex_to_medulla": 3.0,
        "lesion_suv": (6.0, 40.0),
        "lesion_sites": {"liver": 0.15, "spine": 0.30, "pelvis": 0.15, "node": 0.40},
    },
    "DOTATATE": {
        "fraction_of_injected": {"kidneys": 0.022, "liver": 0.03, "spleen": 0.012, "salivary_glands": 0.0008,
                                 "lacrimal_glands": 0.00003, "bladder": 0.005},
        "suv": {"body": 0.3, "lungs": 0.1, "bone": 0.4, "brain": 0.03},
        "kidney_cortex_to_medulla": 3.0,
        "lesion_suv": (8.0, 60.0),
        "lesion_sites": {"liver": 0.50, "spine": 0.12, "pelvis": 0.08, "node": 0.30},
    },
}

TORSO_GROUPS = {  # uptake group -> labelled regions
    "body": ("body",),
    "lungs": ("lung_left", "lung_right"),
    "liver": ("liver",),
    "spleen": ("spleen",),
    "kidneys": ("kidney_left_cortex", "kidney_left_medulla", "kidney_right_cortex", "kidney_right_medulla"),
    "bladder": ("bladder",),
    "bone": ("spine", "pelvis", "skull"),
    "brain": ("brain",),
    "salivary_glands": ("parotid_left", "parotid_right", "submandibular_left", "submandibular_right"),
    "lacrimal_glands": ("lacrimal_left", "lacrimal_right"),
}
TORSO_REGION_NAMES = ("body", "lung_left", "lung_right", "liver", "spleen", "kidney_left_cortex", "kidney_left_medulla",
                      "kidney_right_cortex", "kidney_right_medulla", "bladder", "spine", "pelvis", "skull", "brain",
                      "parotid_left", "parotid_right", "submandibular_left", "submandibular_right",
                      "lacrimal_left", "lacrimal_right")  # label = index + 1; lesion_k follow

TORSO_HU = {"body": 20.0, "lung": HU_LUNG, "liver": 55.0, "spleen": 45.0, "kidney_cortex": 35.0,
            "kidney_medulla": 30.0, "bladder": 5.0, "bone": HU_BONE, "brain": 35.0, "parotid": 10.0,
            "submandibular": 40.0, "lacrimal": 40.0, "lesion_liver": 45.0, "lesion_node": 40.0, "lesion_bone": HU_BONE}

# Lymph-node stations in the reference body frame: (|u| or u range, v range, h range) in mm;
# bilateral stations are mirrored at random.
_NODE_STATIONS = {
    "para_aortic": ((-18.0, 18.0), (10.0, 28.0), (190.0, 320.0), False),
    "common_iliac": ((40.0, 55.0), (10.0, 30.0), (100.0, 160.0), True),
    "mediastinal": ((-12.0, 12.0), (-25.0, 15.0), (400.0, 500.0), False),
    "supraclavicular": ((35.0, 55.0), (-5.0, 15.0), (575.0, 610.0), True),
}
_LESION_MAX_DIAMETER_MM = {"liver": 40.0, "spine": 26.0, "pelvis": 28.0, "node": 30.0}
_LESION_MIN_DIAMETER_MM = 8.0


def _ellipsoid_ml(semi) -> float:
    return 4.0 / 3.0 * math.pi * float(np.prod(semi)) / 1000.0


def torso_phantom(seed: int = 0, voxel_mm: float = 4.4196, shape=None, tracer: str = "PSMA",
                  injected_MBq: float = 7400.0, bed: str | float | None = None,
                  centre_lps_mm=DEFAULT_CENTRE_LPS_MM, variability: float = 1.0, supersample: int = 4) -> Phantom:
    """Anthropomorphic 177Lu patient about 24 h after ``injected_MBq`` of 177Lu-PSMA-617 or -DOTATATE.

    Anatomy (analytic solids in a body frame: u = x to the patient's left, v = y posterior,
    h = height above the pubic symphysis; z = centre_z + h - field centre): elliptical trunk
    (semi-axes 160 x 112 mm, from below the field to the shoulders at h 560 mm, with a rounded
    top), neck, a face/jaw block and head (vertex h ~ 890 mm); lungs, liver (right), spleen
    (left), kidneys (cortex shell 8 mm over a medulla, turned 30 degrees about z), bladder,
    spine (HU 700, thoraco-lumbar and cervical), iliac wings, skull (cranium, HU 700) over the
    brain, parotid and submandibular glands beside and below the jaw, and lacrimal glands in
    the upper outer orbits. Every organ is clipped to the body outline. Then 2 to 6 spherical
    lesions of 8-40 mm in the liver, spine, iliac bone or lymph-node stations (para-aortic,
    common iliac, mediastinal, supraclavicular), only where they fit in the field; a lesion
    replaces the tissue it covers (bone lesions take bone HU: sclerotic).

    Field: the grid is centred on ``centre_lps_mm`` and on height ``bed`` (a name in
    ``TORSO_BEDS_MM`` or a height in mm). With ``shape=None`` the grid holds the whole modelled
    body: (96, 96, 232) at 4.4196 mm (424 x 424 x 1025 mm). A shorter field shows one bed:
    ``bed=None`` then means ``'abdomen'``; organs outside the field are simply absent from
    ``label_names`` and ``regions`` (the salivary and lacrimal glands lie about 450 mm above the
    kidneys, so no 40 cm bed holds both; ``'head_thorax'`` holds the glands). The body is shrunk
    when needed to fit in-plane (the field must be at least 280 mm wide).

    Randomness: ``seed`` fixes everything (separate streams for anatomy, uptake and lesions).
    For one field of view the phantom is the same at every voxel size (so a phantom drawn 2x
    finer for projection matches its truth on the reconstruction grid); in another field the
    anatomy and uptakes stay those of the seed (unless the body had to shrink to fit), while the
    lesions are drawn where that field can hold them. Body width/depth vary by +-12/13%, height
    by +-6%, head size by +-5%, organ sizes by +-12%, organ positions by +-8 mm (head +-3 mm),
    bladder filling 0.5-1.6x, uptakes by a log-normal factor (sigma 0.2, clipped at 2 sigma), the
    cortex:medulla ratio by +-20%. ``variability``
    scales all of these (0: the reference patient, with lesions still drawn from ``seed``).

    Uptake, 24 h p.i. (``TORSO_UPTAKE``). Whole organs hold ``fraction_of_injected`` x
    ``injected_MBq`` (physical activity at the scan); the concentration is that over the organ's
    analytic volume, so a cut organ keeps its true concentration. Other tissue is set by SUV
    (C = SUV x injected x 2^(-24 h / 159.5 h) / 80 kg; SUV 1 = 0.0834 MBq/mL for 7.4 GBq).

    Values per organ and tracer, their sources and the count level this gives: docs/simulation.md.

    Labels: ``TORSO_REGION_NAMES`` in that order (1, 2, ...) and ``lesion_1`` ... after them.
    ``regions[name]``: ``label``, ``group`` (key of ``TORSO_GROUPS`` or 'lesions'),
    ``concentration_MBq_per_mL``, ``voxelised_volume_ml`` and ``activity_MBq`` (what the field
    holds); whole organs also ``volume_ml`` (analytic) and ``group_activity_MBq`` (the uptake
    group's whole activity); lesions ``centre_lps_mm``, ``diameter_mm``, ``volume_ml``, ``site``.
    """
    if tracer not in TORSO_UPTAKE:
        raise SSPECTError(f"Unknown tracer '{tracer}'; choose one of {', '.join(TORSO_UPTAKE)}.")
    if injected_MBq <= 0 or voxel_mm <= 0:
        raise SSPECTError("The injected activity and the voxel size must be positive.")
    voxel_mm = float(voxel_mm)
    if shape is None:
        shape = (even_ceil(_TORSO_WHOLE_FIELD_MM[0] / voxel_mm),) * 2 + (even_ceil(_TORSO_WHOLE_FIELD_MM[1] / voxel_mm),)
        bed = "whole_body" if bed is None else bed
    shape = tuple(int(n) for n in shape)
    check_square_grid(shape, "torso_phantom")
    field_xy, field_h = shape[0] * voxel_mm, shape[2] * voxel_mm
    if bed is None:
        bed = "whole_body" if field_h >= _TORSO_WHOLE_FIELD_MM[1] - 20 else "abdomen"
    if isinstance(bed, str):
        if bed not in TORSO_BEDS_MM:
            raise SSPECTError(f"Unknown bed '{bed}'; choose one of {', '.join(TORSO_BEDS_MM)} or give a height in mm.")
        h_centre = TORSO_BEDS_MM[bed]
    else:
        h_centre = float(bed)
    if field_xy < 280.0:
        raise SSPECTError(f"The field is {field_xy:.0f} mm wide; the torso needs at least 280 mm (more voxels or larger ones).")

    cx, cy, cz = (float(c) for c in centre_lps_mm)
    origin = centred_origin(shape, voxel_mm, (cx, cy, cz))
    grid = Grid(shape, voxel_mm, origin)
    h_lo, h_hi = h_centre - field_h / 2, h_centre + field_h / 2

    def lps(u, v, h):
        return (cx + u, cy + v, cz + h - h_centre)

    rng = np.random.default_rng([int(seed), 1])  # anatomy

    def factor(spread):
        return 1.0 + variability * rng.uniform(-spread, spread)

    def jitter(mm):
        return variability * rng.uniform(-mm, mm)

    sa, sb, sh, hs = factor(0.12), factor(0.13), factor(0.06), factor(0.05)
    sa = min(sa, 0.46 * field_xy / 160.0)
    sb = min(sb, 0.46 * field_xy / 112.0)
    a_body, b_body = 160.0 * sa, 112.0 * sb

    def trunk_organ(u, v, h, semi, spread=0.12, shift=8.0, scale_with_body=False):
        s = factor(spread)
        centre = (u * sa + jitter(shift), v * sb + jitter(shift), h * sh + jitter(shift))
        body = (sa, sb, sh) if scale_with_body else (math.sqrt(sa), math.sqrt(sb), sh)
        return centre, tuple(semi[a] * s * body[a] for a in range(3))

    head_h = 790.0 * sh

    def head_organ(u, v, h, semi, spread=0.12, shift=3.0):
        s = factor(spread)
        centre = (u * hs + jitter(shift), v * hs + jitter(shift), head_h + (h - 790.0) * hs + jitter(shift))
        return centre, tuple(x * s * hs for x in semi)

    def body_ellipsoid(centre, semi, angle=0.0):
        return ellipsoid(lps(*centre), semi, angle)

    def prism(u, v, semi, h0, h1):
        return elliptic_prism(lps(u, v, 0.0)[:2], semi, lps(0, 0, h0)[2], lps(0, 0, h1)[2])

    # Body outline: trunk with a rounded top, neck, face/jaw block, head.
    shoulder_h, neck_top_h = 560.0 * sh, 680.0 * sh
    body = prism(0, 0, (a_body, b_body), -400.0, shoulder_h) \
        | body_ellipsoid((0, 0, shoulder_h), (a_body, b_body, 60.0 * sh)) \
        | prism(0, 10.0 * hs, (56.0 * hs, 60.0 * hs), 520.0 * sh, neck_top_h) \
        | prism(0, 0, (70.0 * hs, 84.0 * hs), head_h - 150.0 * hs, head_h - 30.0 * hs) \
        | body_ellipsoid((0, 3.0 * hs, head_h), (80.0 * hs, 104.0 * hs, 100.0 * hs))

    anatomy = {}
    anatomy["lung_left"] = trunk_organ(78, 5, 465, (52, 72, 120), scale_with_body=True)
    anatomy["lung_right"] = trunk_organ(-78, 5, 465, (52, 72, 120), scale_with_body=True)
    anatomy["liver"] = trunk_organ(-62, -5, 300, (88, 68, 68))
    anatomy["spleen"] = trunk_organ(82, 35, 320, (28, 38, 46))
    anatomy["kidney_left"] = trunk_organ(58, 52, 235, (30, 22, 55))
    anatomy["kidney_right"] = trunk_organ(-58, 52, 215, (30, 22, 55))
    filling = math.exp(variability * rng.uniform(math.log(0.5), math.log(1.6)))
    bladder_centre, bladder_semi = trunk_organ(0, -25, 45, (42, 36, 38), spread=0.0)
    bladder_semi = tuple(x * filling ** (1 / 3) for x in bladder_semi)
    spine_u, spine_v = jitter(3.0), 62.0 * sb + jitter(4.0)
    spine_h = (110.0 * sh, shoulder_h)
    wing_left = trunk_organ(88, 25, 130, (20, 40, 50))
    wing_right = trunk_organ(-88, 25, 130, (20, 40, 50))
    cranium = head_organ(0, 12, 805, (70, 88, 82), spread=0.03)
    parotid_left = head_organ(46, 15, 700, (13, 22, 24))
    parotid_right = head_organ(-46, 15, 700, (13, 22, 24))
    submandibular_left = head_organ(34, -25, 655, (11, 14, 11))
    submandibular_right = head_organ(-34, -25, 655, (11, 14, 11))
    lacrimal_left = head_organ(33, -72, 770, (8, 5, 4), shift=1.5)
    lacrimal_right = head_organ(-33, -72, 770, (8, 5, 4), shift=1.5)

    hu = TORSO_HU
    solids = [("body", body, hu["body"])]
    for side in ("left", "right"):
        solids.append((f"lung_{side}", body_ellipsoid(*anatomy[f"lung_{side}"]) & body, hu["lung"]))
    solids.append(("liver", body_ellipsoid(*anatomy["liver"]) & body, hu["liver"]))
    solids.append(("spleen", body_ellipsoid(*anatomy["spleen"]) & body, hu["spleen"]))
    medulla_semi = {}
    for side, angle in (("left", -30.0), ("right", 30.0)):
        centre, semi = anatomy[f"kidney_{side}"]
        medulla_semi[side] = tuple(max(x - 8.0, 0.4 * x) for x in semi)
        solids.append((f"kidney_{side}_cortex", body_ellipsoid(centre, semi, angle) & body, hu["kidney_cortex"]))
        solids.append((f"kidney_{side}_medulla", body_ellipsoid(centre, medulla_semi[side], angle) & body,
                       hu["kidney_medulla"]))
    solids.append(("bladder", body_ellipsoid(bladder_centre, bladder_semi) & body, hu["bladder"]))
    solids.append(("spine", (prism(spine_u, spine_v, (17.0, 15.0), *spine_h)
                             | prism(spine_u, 32.0 * hs, (13.0, 12.0), shoulder_h - 20.0, head_h - 55.0 * hs)) & body,
                   hu["bone"]))
    solids.append(("pelvis", (body_ellipsoid(*wing_left, angle=-20.0) | body_ellipsoid(*wing_right, angle=20.0)) & body,
                   hu["bone"]))
    brain_semi = tuple(x - 7.0 for x in cranium[1])
    solids.append(("skull", body_ellipsoid(*cranium) & body, hu["bone"]))
    solids.append(("brain", body_ellipsoid(cranium[0], brain_semi) & body, hu["brain"]))
    for name, organ, tissue in (("parotid_left", parotid_left, "parotid"), ("parotid_right", parotid_right, "parotid"),
                                ("submandibular_left", submandibular_left, "submandibular"),
                                ("submandibular_right", submandibular_right, "submandibular"),
                                ("lacrimal_left", lacrimal_left, "lacrimal"), ("lacrimal_right", lacrimal_right, "lacrimal")):
        solids.append((name, body_ellipsoid(*organ) & body, hu[tissue]))

    analytic_ml = {
        "liver": _ellipsoid_ml(anatomy["liver"][1]), "spleen": _ellipsoid_ml(anatomy["spleen"][1]),
        "bladder": _ellipsoid_ml(bladder_semi),
        "parotid_left": _ellipsoid_ml(parotid_left[1]), "parotid_right": _ellipsoid_ml(parotid_right[1]),
        "submandibular_left": _ellipsoid_ml(submandibular_left[1]),
        "submandibular_right": _ellipsoid_ml(submandibular_right[1]),
        "lacrimal_left": _ellipsoid_ml(lacrimal_left[1]), "lacrimal_right": _ellipsoid_ml(lacrimal_right[1]),
    }
    for side in ("left", "right"):
        outer, inner = _ellipsoid_ml(anatomy[f"kidney_{side}"][1]), _ellipsoid_ml(medulla_semi[side])
        analytic_ml[f"kidney_{side}_cortex"], analytic_ml[f"kidney_{side}_medulla"] = outer - inner, inner

    # Lesions, drawn where the field can hold them.
    uptake = TORSO_UPTAKE[tracer]
    suv_unit = injected_MBq * 2.0 ** (-TORSO_HOURS_POST_INJECTION * 3600 / LUTETIUM_177.half_life_s) / TORSO_REFERENCE_MASS_G
    lesion_rng = np.random.default_rng([int(seed), 3])
    lesions = _draw_lesions(lesion_rng, uptake, anatomy, wing_left, wing_right, (spine_u, spine_v, spine_h),
                            (sa, sb, sh), (h_lo, h_hi))
    for k, lesion in enumerate(lesions, start=1):
        lesion["name"] = f"lesion_{k}"
        lesion["concentration"] = lesion["suv"] * suv_unit
        solids.append((lesion["name"], sphere(lps(*lesion["centre"]), lesion["diameter"]) & body,
                       hu["lesion_bone" if lesion["site"] in ("spine", "pelvis") else f"lesion_{lesion['site']}"]))

    # Concentrations: whole-organ activity over the analytic volume, SUV for the rest.
    uptake_rng = np.random.default_rng([int(seed), 2])
    spread = {group: math.exp(variability * 0.2 * float(np.clip(uptake_rng.standard_normal(), -2, 2)))
              for group in TORSO_GROUPS}
    cortex_ratio = uptake["kidney_cortex_to_medulla"] * (1.0 + variability * uptake_rng.uniform(-0.2, 0.2))
    concentration, group_activity = {}, {}
    for group, fraction in uptake["fraction_of_injected"].items():
        members = TORSO_GROUPS[group]
        relative = {m: cortex_ratio if m.endswith("_cortex") else 1.0 for m in members}
        total = fraction * injected_MBq * spread[group]
        per_relative = total / sum(relative[m] * analytic_ml[m] for m in members)
        for m in members:
            concentration[m] = relative[m] * per_relative
        group_activity[group] = total
    for group, suv in uptake["suv"].items():
        for m in TORSO_GROUPS[group]:
            concentration[m] = suv * spread[group] * suv_unit
    for lesion in lesions:
        concentration[lesion["name"]] = lesion["concentration"]

    # Lesions are small: their sub-voxel points are counted twice as finely.
    layers = paint(grid, [(name, solid, tissue_hu, 2 * supersample if name.startswith("lesion_") else supersample)
                           for name, solid, tissue_hu in solids])
    weights = region_weights(grid, layers)
    label_ids = {name: i + 1 for i, name in enumerate(TORSO_REGION_NAMES)}
    label_ids.update({lesion["name"]: len(TORSO_REGION_NAMES) + k for k, lesion in enumerate(lesions, start=1)})
    activity, hu_array, labels, present = render(grid, layers, weights, concentration, label_ids)

    group_of = {m: g for g, members in TORSO_GROUPS.items() for m in members}
    regions = {}
    for name in present:
        voxelised = float(weights[name][1].sum(dtype=np.float64) * grid.voxel_ml)
        info = {"label": label_ids[name], "group": group_of.get(name, "lesions"),
                "concentration_MBq_per_mL": float(concentration.get(name, 0.0)),
                "voxelised_volume_ml": voxelised,
                "activity_MBq": float(concentration.get(name, 0.0)) * voxelised}
        if name in analytic_ml:
            info["volume_ml"] = analytic_ml[name]
        if info["group"] in group_activity:
            info["group_activity_MBq"] = group_activity[info["group"]]
        regions[name] = info
    for lesion in lesions:
        if lesion["name"] in regions:
            regions[lesion["name"]].update({
                "centre_lps_mm": tuple(round(c, 9) for c in lps(*lesion["centre"])), "diameter_mm": lesion["diameter"],
                "volume_ml": math.pi / 6 * lesion["diameter"] ** 3 / 1000.0, "site": lesion["site"],
                "suv": lesion["suv"]})
    return Phantom(activity, hu_array, labels, present, (voxel_mm,) * 3, origin, regions=regions)


def _draw_lesions(rng, uptake, anatomy, wing_left, wing_right, spine, body_scale, field_h) -> list[dict]:
    """2-6 non-overlapping spherical lesions at sites that fit inside the field's height."""
    sa, sb, sh = body_scale
    spine_u, spine_v, (spine_h0, spine_h1) = spine
    h_lo, h_hi = field_h
    margin = 2.0

    def unit_ball_point(scale):
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        return direction * scale * rng.uniform() ** (1 / 3)

    def in_organ(organ, scale):
        centre, semi = organ
        return tuple(np.asarray(centre) + np.asarray(semi) * unit_ball_point(scale))

    def h_span(site):
        """Height range of lesion centres at this site (body frame, mm)."""
        if site == "liver":
            c, s = anatomy["liver"]
            return c[2] - 0.6 * s[2], c[2] + 0.6 * s[2]
        if site == "spine":
            return spine_h0, spine_h1
        if site == "pelvis":
            return min(w[0][2] - 0.45 * w[1][2] for w in (wing_left, wing_right)), \
                max(w[0][2] + 0.45 * w[1][2] for w in (wing_left, wing_right))
        spans = [(h[0] * sh, h[1] * sh) for _, _, h, _ in _NODE_STATIONS.values()]
        return min(s[0] for s in spans), max(s[1] for s in spans)

    def fits_height(h, radius):
        return h_lo + radius + margin <= h <= h_hi - radius - margin

    n_lesions = int(rng.integers(2, 7))
    sites = [s for s in uptake["lesion_sites"]
             if h_span(s)[1] >= h_lo + _LESION_MIN_DIAMETER_MM / 2 + margin
             and h_span(s)[0] <= h_hi - _LESION_MIN_DIAMETER_MM / 2 - margin]
    lesions: list[dict] = []
    if not sites:
        return lesions
    p = np.asarray([uptake["lesion_sites"][s] for s in sites], float)
    p /= p.sum()
    suv_lo, suv_hi = uptake["lesion_suv"]
    for _ in range(n_lesions):
        for _attempt in range(100):
            site = sites[int(rng.choice(len(sites), p=p))]
            diameter = float(math.exp(rng.uniform(math.log(_LESION_MIN_DIAMETER_MM),
                                                  math.log(_LESION_MAX_DIAMETER_MM[site]))))
            radius = diameter / 2
            if site == "liver":
                centre = in_organ(anatomy["liver"], 0.6)
            elif site == "pelvis":
                centre = in_organ(wing_left if rng.uniform() < 0.5 else wing_right, 0.45)
            elif site == "spine":
                centre = (spine_u + rng.uniform(-3, 3), spine_v + rng.uniform(-3, 3),
                          rng.uniform(spine_h0 + radius, spine_h1 - radius))
            else:
                stations = list(_NODE_STATIONS.values())
                u_range, v_range, h_range, bilateral = stations[int(rng.integers(len(stations)))]
                u = rng.uniform(*u_range) * (rng.choice((-1.0, 1.0)) if bilateral else 1.0)
                centre = (u * sa, rng.uniform(*v_range) * sb, rng.uniform(*h_range) * sh)
            centre = tuple(float(c) for c in centre)
            if not fits_height(centre[2], radius):
                continue
            if any(math.dist(centre, other["centre"]) < radius + other["diameter"] / 2 + margin for other in lesions):
                continue
            suv = float(math.exp(rng.uniform(math.log(suv_lo), math.log(suv_hi))))
            lesions.append({"site": site, "centre": centre, "diameter": diameter, "suv": suv})
            break
    return lesions

