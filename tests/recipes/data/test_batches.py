"""Data: batch order a pure function of (seed, epoch), any start batch, seeded augmentation and split."""
from __future__ import annotations

import pytest
import torch

from recipes.data import (EpochBatchSampler, LoaderBatches, TensorBatches, mix_seed, random_crop_flip,
                          split_indices, synthetic_tensors)

N = 30


def _labelled(n=N, size=4):
    """Images whose every pixel holds the sample's index, so a batch shows which samples it holds."""
    x = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 1, size, size).contiguous()
    return x, torch.arange(n)


def _epoch(data, epoch, start=0):
    data.set_position(epoch, start)
    return [(xb.clone(), yb.clone()) for xb, yb in data]


def _ids(batches):
    return [yb.tolist() for _, yb in batches]


def test_every_epoch_is_a_permutation_in_batches():
    data = TensorBatches(*_labelled(), batch_size=8, seed=3)
    assert len(data) == 4
    batches = _epoch(data, 1)
    assert [len(yb) for _, yb in batches] == [8, 8, 8, 6]
    assert sorted(sum(_ids(batches), [])) == list(range(N))
    for xb, yb in batches:  # inputs and targets stay paired
        assert torch.equal(xb[:, 0, 0, 0].long(), yb)


def test_the_order_is_a_pure_function_of_seed_and_epoch():
    a = TensorBatches(*_labelled(), batch_size=8, seed=3)
    b = TensorBatches(*_labelled(), batch_size=8, seed=3)
    for epoch in (1, 2, 3):
        _epoch(a, epoch)  # a has seen earlier epochs, b has not
    assert _ids(_epoch(a, 4)) == _ids(_epoch(b, 4))
    assert _ids(_epoch(a, 4)) == _ids(_epoch(a, 4))  # and again
    assert _ids(_epoch(b, 4)) != _ids(_epoch(b, 5))
    assert _ids(_epoch(b, 4)) != _ids(_epoch(TensorBatches(*_labelled(), batch_size=8, seed=4), 4))


def test_without_shuffle_the_stored_order_is_kept():
    data = TensorBatches(*_labelled(), batch_size=8, shuffle=False)
    assert sum(_ids(_epoch(data, 2)), []) == list(range(N))


@pytest.mark.parametrize("start", [0, 1, 3, 4])
def test_set_position_starts_the_epoch_at_any_batch(start):
    data = TensorBatches(*_labelled(), batch_size=8, seed=3)
    full = _epoch(TensorBatches(*_labelled(), batch_size=8, seed=3), 2)
    resumed = _epoch(data, 2, start)
    assert _ids(resumed) == _ids(full[start:])


def test_set_position_refuses_a_batch_outside_the_epoch():
    data = TensorBatches(*_labelled(), batch_size=8)
    with pytest.raises(ValueError):
        data.set_position(1, 5)
    with pytest.raises(ValueError):
        data.set_position(1, -1)


def test_drop_last_and_bad_arguments():
    assert len(TensorBatches(*_labelled(), batch_size=8, drop_last=True)) == 3
    x, y = _labelled()
    with pytest.raises(ValueError):
        TensorBatches(x, y[:-1], batch_size=8)
    with pytest.raises(ValueError):
        TensorBatches(x, y, batch_size=0)


def test_ranks_read_disjoint_shards_of_the_shared_order():
    shards = [TensorBatches(*_labelled(), batch_size=4, seed=3, rank=r, world_size=3) for r in range(3)]
    ids = [sum(_ids(_epoch(s, 2)), []) for s in shards]
    assert all(len(i) == N // 3 for i in ids)
    assert len(set(ids[0]) | set(ids[1]) | set(ids[2])) == N


def _shift_of(original, shifted, pad):
    """The (dy, dx) such that ``shifted`` is ``original`` moved by it with zero fill, or None."""
    h, w = original.shape[-2:]
    padded = torch.nn.functional.pad(original, (pad, pad, pad, pad))
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            if torch.equal(padded[..., dy : dy + h, dx : dx + w], shifted):
                return dy - pad, dx - pad
    return None


def test_random_crop_flip_keeps_shapes_and_shifts_content():
    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = random_crop_flip(x, torch.Generator().manual_seed(1), pad=2)
    assert out.shape == x.shape and out.dtype == x.dtype
    shifts = [_shift_of(a, b, 2) for a, b in zip(x, out)]
    assert None not in shifts
    assert len(set(shifts)) > 1  # images move differently
    assert any(s != (0, 0) for s in shifts)


def test_random_crop_flip_mirrors_some_images():
    x = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = random_crop_flip(x, torch.Generator().manual_seed(1), pad=1, flip=True)
    mirrored = [_shift_of(a.flip(-1), b, 1) is not None for a, b in zip(x, out)]
    plain = [_shift_of(a, b, 1) is not None for a, b in zip(x, out)]
    assert all(m or p for m, p in zip(mirrored, plain))
    assert any(mirrored) and any(plain)


def test_random_crop_flip_follows_its_generator_only():
    x = torch.rand(8, 3, 8, 8)
    first = random_crop_flip(x, torch.Generator().manual_seed(5), flip=True)
    torch.rand(100)  # the global generator plays no part
    assert torch.equal(first, random_crop_flip(x, torch.Generator().manual_seed(5), flip=True))
    assert not torch.equal(first, random_crop_flip(x, torch.Generator().manual_seed(6), flip=True))


def test_augmentation_is_seeded_by_seed_epoch_and_batch():
    def augment(xb, generator):
        return random_crop_flip(xb, generator, pad=1, flip=True)

    x, y = torch.rand(N, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(N)
    data = TensorBatches(x, y, batch_size=8, seed=3, augment=augment)
    again = TensorBatches(x, y, batch_size=8, seed=3, augment=augment)
    epoch2 = _epoch(data, 2)
    torch.rand(10)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(epoch2, _epoch(again, 2)))
    # batch 2 of epoch 2 is augmented the same when an epoch starts there (a resume)
    assert torch.equal(_epoch(again, 2, start=2)[0][0], epoch2[2][0])
    # other epochs (here with the same samples: no shuffle) are augmented differently
    plain = TensorBatches(x, y, batch_size=8, seed=3, shuffle=False, augment=augment)
    assert not torch.equal(_epoch(plain, 1)[0][0], _epoch(plain, 2)[0][0])
    other_seed = TensorBatches(x, y, batch_size=8, seed=4, shuffle=False, augment=augment)
    assert not torch.equal(_epoch(plain, 1)[0][0], _epoch(other_seed, 1)[0][0])


def test_loader_batches_equal_tensor_batches():
    x, y = _labelled()
    sampler = EpochBatchSampler(N, 8, seed=3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_sampler=sampler)
    loaded = LoaderBatches(loader, seed=3)
    tensors = TensorBatches(x, y, batch_size=8, seed=3)
    assert len(loaded) == len(tensors)
    assert _ids(_epoch(loaded, 2)) == _ids(_epoch(tensors, 2))
    assert _ids(_epoch(loaded, 3, start=1)) == _ids(_epoch(tensors, 3, start=1))


def test_split_is_seeded_disjoint_and_complete():
    train, val = split_indices(100, 0.2, seed=0)
    assert len(val) == 20 and len(train) == 80
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(100))
    same = split_indices(100, 0.2, seed=0)
    assert torch.equal(same[0], train) and torch.equal(same[1], val)
    assert not torch.equal(split_indices(100, 0.2, seed=1)[1], val)
    assert len(split_indices(10, 0.01, seed=0)[1]) == 1  # never an empty validation set


def test_mix_seed_is_stable_distinct_and_in_range():
    seeds = {mix_seed(s, e, b) for s in range(3) for e in range(5) for b in range(5)}
    assert len(seeds) == 75
    assert all(0 <= s < 2**62 for s in seeds)
    assert mix_seed(1, 2) == mix_seed(1, 2) != mix_seed(2, 1)


def test_digits_tensors(digits):
    x, y = digits
    assert x.shape == (1797, 1, 16, 16) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert sorted(y.unique().tolist()) == list(range(10))


def test_synthetic_tensors_are_seeded_and_balanced():
    x, y = synthetic_tensors(40, 4, 8, seed=1)
    assert x.shape == (40, 3, 8, 8) and y.shape == (40,)
    assert torch.bincount(y).tolist() == [10, 10, 10, 10]
    x2, y2 = synthetic_tensors(40, 4, 8, seed=1)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(synthetic_tensors(40, 4, 8, seed=2)[0], x)
