"""Neighbor2Neighbor on the projections: the neighbour sub-sampling (its defaults against noisy OSEM: test_splitting.py)."""
from __future__ import annotations

import torch

from sspect.methods.neighbor2neighbor import neighbour_cells, subsample


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
