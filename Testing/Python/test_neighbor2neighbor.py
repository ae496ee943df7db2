"""Neighbor2Neighbor on the projections: the neighbour sub-sampling, and the defaults against the noisy OSEM they replace."""
from __future__ import annotations

import time

import pytest
import torch

from sspect.eval.metrics import nrmse
from sspect.methods import get_method
from sspect.methods.neighbor2neighbor import neighbour_cells, subsample

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_two_sub_sinograms_take_two_different_pixels_of_every_cell():
    # every pixel holds its own index, so a sub-sample says which pixel of its cell it took
    volume = torch.arange(2 * 3 * 6 * 8, dtype=torch.float64).reshape(1, 1, 6, 8, 2 * 3)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        first, second = neighbour_cells(volume.shape, volume.device)
    a, b = subsample(volume, first), subsample(volume, second)
    assert a.shape == b.shape == (1, 1, 6, 4, 3)
    assert torch.all(a != b)
    t, r, z = torch.meshgrid(torch.arange(6), torch.arange(4), torch.arange(3), indexing="ij")
    for taken in (a, b):
        view, row, column = (taken[0, 0].long() // 48), (taken[0, 0].long() % 48) // 6, taken[0, 0].long() % 6
        assert torch.equal(view, t) and torch.equal(row // 2, r) and torch.equal(column // 2, z)  # inside its own cell
    # an odd detector edge is left out rather than paired with the next view
    assert subsample(torch.zeros(1, 1, 2, 5, 7), neighbour_cells((1, 1, 2, 5, 7), "cpu")[0]).shape == (1, 1, 2, 2, 3)


def test_defaults_beat_the_noisy_osem_image_on_a_tenth_of_the_counts(noisy_problem, noisy_to_mbq_per_ml, small_study):
    """Truth scores only. The projections are denoised, then OSEM with the method's iterations: compared with OSEM of
    the same noisy counts and iterations."""
    truth = small_study["phantom"].activity
    method = get_method("neighbor2neighbor")
    defaults = method.validate({})
    osem = get_method("osem").reconstruct(noisy_problem, {"iterations": defaults["iterations"],
                                                          "subsets": defaults["subsets"]}).image
    started = time.perf_counter()
    result = method.reconstruct(noisy_problem, {})
    seconds = time.perf_counter() - started
    score, reference = nrmse(result.image * noisy_to_mbq_per_ml, truth), nrmse(osem * noisy_to_mbq_per_ml, truth)
    print(f"NRMSE neighbor2neighbor {score:.3f} (best step {result.info['best_step']}, {seconds:.1f} s), "
          f"OSEM {defaults['iterations']}x{defaults['subsets']} {reference:.3f}")
    assert score < 0.97 * reference
    assert abs(result.image.sum() / osem.sum() - 1) < 0.05
