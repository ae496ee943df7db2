"""The learned methods' toolkit: count splits, losses, the early stopping, the network factory and padding, weights files."""
from __future__ import annotations

import pytest
import torch

from sspect.errors import SSPECTError
from sspect.methods.toolkit.counts import split_counts
from sspect.methods.toolkit.fitting import EarlyStopping
from sspect.methods.toolkit.losses import poisson_nll
from sspect.methods.toolkit.networks import Padding, image_scale, unet
from sspect.methods.toolkit.weights import read_weights, save_weights, tensors_of


def test_binomial_split_adds_up_and_holds_out_the_asked_share():
    counts = torch.poisson(torch.full((24, 32, 32), 20.0), generator=torch.Generator().manual_seed(1))
    train, validation = split_counts(counts, 0.1, seed=3)
    assert torch.equal(train + validation, counts)
    assert train.min() >= 0 and validation.min() >= 0 and train.dtype == counts.dtype
    assert abs(float(validation.sum() / counts.sum()) - 0.1) < 0.005
    again, _ = split_counts(counts, 0.1, seed=3)
    other, _ = split_counts(counts, 0.1, seed=4)
    assert torch.equal(again, train) and not torch.equal(other, train)


def test_poisson_nll_is_zero_for_a_perfect_fit_and_grows_away_from_it():
    counts = torch.tensor([0.0, 1.0, 5.0, 20.0])
    assert float(poisson_nll(counts.clamp_min(1e-12), counts)) == pytest.approx(0.0, abs=1e-6)
    assert float(poisson_nll(counts + 1, counts)) > 0 and float(poisson_nll(counts * 0.8 + 0.1, counts)) > 0


def test_early_stopping_keeps_the_lowest_check_and_stops_patience_checks_after_it():
    stopping = EarlyStopping(patience=2)
    for step, value in ((1, 5.0), (2, 3.0), (3, 4.0)):
        stopping.update(step, value, f"image {step}")
        assert not stopping.should_stop
    stopping.update(4, 3.5, "image 4")
    assert stopping.should_stop and stopping.best_step == 2 and stopping.kept == "image 2"
    assert stopping.history == [[1, 5.0], [2, 3.0], [3, 4.0], [4, 3.5]]
    never = EarlyStopping(patience=0)
    for step in range(1, 20):
        never.update(step, float(step), step)
    assert not never.should_stop and never.best_step == 1
    without_hold_out = EarlyStopping(patience=1)
    for step in range(1, 5):
        without_hold_out.update(step, None, step)
    assert not without_hold_out.should_stop and without_hold_out.kept == 4 and without_hold_out.history == []


@pytest.mark.parametrize("shape", [(32, 32, 32), (27, 30, 17)])
def test_padding_reaches_the_unet_stride_and_crops_back_exactly(shape):
    padding = Padding(shape)
    volume = torch.rand((2, 1) + shape, generator=torch.Generator().manual_seed(0))
    padded = padding.pad(volume)
    assert all(size % 8 == 0 and size >= original for size, original in zip(padded.shape[2:], shape))
    assert torch.equal(padding.crop(padded), volume)


@pytest.mark.parametrize("head", ["positive", "correction", "residual"])
def test_every_head_starts_from_a_known_output(head):
    import torch.nn.functional as F

    with torch.random.fork_rng():
        torch.manual_seed(0)
        network = unet(4, head=head, start_value=2.0)
    x = torch.rand((1, 1, 16, 16, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        output = network(x)
    expected = {"positive": torch.full_like(x, 2.0), "correction": torch.zeros_like(x), "residual": x}[head]
    shown = F.softplus(output) if head == "positive" else output
    torch.testing.assert_close(shown, expected)


def test_the_scale_is_the_99_9th_percentile():
    volume = torch.arange(100000, dtype=torch.float32)
    assert image_scale(volume) == pytest.approx(99900, rel=1e-3)


def test_a_weights_file_round_trips_and_refuses_damage_and_another_format(tmp_path):
    network = unet(4, head="correction")
    path = tmp_path / "net.safetensors"
    written = save_weights(tensors_of(network), path, {"format": "test/1", "voxel_mm": [4.4, 4.4, 4.4], "features": 4},
                           json_copy=True)
    state, description = read_weights(path, "this test", "test/1", "a test network")
    assert description == written and description["voxel_mm"] == [4.4, 4.4, 4.4] and len(description["sha256"]) == 64
    assert all(torch.equal(state[name], tensor) for name, tensor in tensors_of(network).items())
    assert path.with_suffix(".json").is_file()
    with pytest.raises(SSPECTError, match="is not another network .*expected other/1"):
        read_weights(path, "this test", "other/1", "another network")
    damaged = bytearray(path.read_bytes())
    damaged[-1] ^= 0xFF
    path.write_bytes(bytes(damaged))
    with pytest.raises(SSPECTError, match="sha256"):
        read_weights(path, "this test", "test/1", "a test network")
