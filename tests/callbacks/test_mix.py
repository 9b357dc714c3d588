"""MixUpCutMix: mixed images match their soft labels, draws follow the batch position, the loss takes them."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events

from callbacks import MixUpCutMix
from engine import create_trainer

NUM_CLASSES = 3


def _batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), torch.arange(n) % NUM_CLASSES


def test_mixup_blends_each_image_with_its_neighbour_in_the_proportion_of_its_label():
    x, y = _batch()
    mixed, soft = MixUpCutMix(NUM_CLASSES, mixup_alpha=0.4, seed=1).mix((x, y), iteration=7)
    assert soft.shape == (8, NUM_CLASSES) and soft.dtype == torch.float32
    torch.testing.assert_close(soft.sum(1), torch.ones(8))
    lam = soft[0, y[0]].item()  # image 0 is mixed with image 7 (a different class)
    assert 0.0 < lam < 1.0
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.roll(1, 0))
    torch.testing.assert_close(soft, lam * F.one_hot(y, NUM_CLASSES) + (1 - lam) * F.one_hot(y.roll(1, 0), NUM_CLASSES))


def test_cutmix_pastes_a_box_whose_area_is_the_label_share():
    x, y = torch.zeros(8, 3, 16, 16), torch.arange(8) % NUM_CLASSES
    x += torch.arange(8).view(8, 1, 1, 1).float()  # image i is all i: pasted pixels show where they came from
    shares = []
    for iteration in range(1, 30):
        mixed, soft = MixUpCutMix(NUM_CLASSES, cutmix_alpha=1.0, seed=0).mix((x, y), iteration)
        from_neighbour = (mixed[1] == 0).float().mean().item()  # image 1's neighbour is image 0
        assert soft[1, y[0]].item() == pytest.approx(from_neighbour, abs=1e-6)
        shares.append(from_neighbour)
    assert len(set(shares)) > 10  # the box changes from batch to batch


def test_the_draws_are_a_function_of_seed_iteration_and_leave_the_global_generator_alone():
    batch = _batch()
    mix = MixUpCutMix(NUM_CLASSES, mixup_alpha=0.2, cutmix_alpha=1.0, seed=4)
    before = torch.get_rng_state()
    first = mix.mix(batch, iteration=11)
    assert torch.equal(torch.get_rng_state(), before)
    again = MixUpCutMix(NUM_CLASSES, mixup_alpha=0.2, cutmix_alpha=1.0, seed=4).mix(batch, iteration=11)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(mix.mix(batch, iteration=12)[1], first[1])
    assert not torch.equal(MixUpCutMix(NUM_CLASSES, mixup_alpha=0.2, cutmix_alpha=1.0, seed=5).mix(batch, 11)[1], first[1])


def test_with_both_on_each_batch_gets_one_of_them():
    x, y = _batch()
    mix = MixUpCutMix(NUM_CLASSES, mixup_alpha=0.4, cutmix_alpha=1.0, seed=0)
    kinds = set()
    for iteration in range(1, 21):
        mixed, _ = mix.mix((x, y), iteration)
        untouched = (mixed == x).float().mean().item()  # CutMix leaves most pixels as they were, MixUp none
        kinds.add("cutmix" if untouched > 0.05 else "mixup")
    assert kinds == {"mixup", "cutmix"}


def test_the_step_trains_on_the_mixed_batch_with_soft_targets(make_model, batches):
    model = make_model()
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.05), loss_fn, seed=0)
    handles = MixUpCutMix(NUM_CLASSES, mixup_alpha=0.4, seed=0).attach(trainer)
    seen = []
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: seen.append(e.state.batch))
    trainer.run(batches, max_epochs=2)
    assert len(seen) == 8 and all(y.shape == (8, NUM_CLASSES) for _, y in seen)
    assert trainer.state.output.y.dim() == 2 and torch.isfinite(trainer.state.output.loss)
    assert not torch.equal(seen[0][0], batches[0][0])
    assert not torch.equal(seen[0][0], seen[4][0]), "epoch 2 mixes batch 1 differently from epoch 1"
    for handle in handles:
        handle.remove()
    trainer.run(batches, max_epochs=2)  # a second, fresh run: no longer mixed
    assert trainer.state.output.y.dim() == 1


def test_a_resumed_run_mixes_exactly_as_the_uninterrupted_one(make_model, batches):
    def mixed_batches(state=None, epochs=2):
        model = make_model()
        trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.05), F.cross_entropy, seed=0)
        if state is not None:
            trainer.load_state_dict(state)
        MixUpCutMix(NUM_CLASSES, mixup_alpha=0.4, cutmix_alpha=1.0, seed=2).attach(trainer)
        seen = []
        trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: seen.append((e.state.iteration, e.state.batch)))
        trainer.run(batches, max_epochs=epochs)
        return trainer, seen

    straight = dict(mixed_batches()[1])
    first, _ = mixed_batches(epochs=1)
    resumed = mixed_batches(state=first.state_dict())[1]
    assert [i for i, _ in resumed] == [5, 6, 7, 8]
    for iteration, (x, y) in resumed:
        assert torch.equal(x, straight[iteration][0]) and torch.equal(y, straight[iteration][1])


@pytest.mark.parametrize("kwargs, match", [
    ({"num_classes": 1, "mixup_alpha": 0.2}, "num_classes"),
    ({"num_classes": 3}, "mixup_alpha or cutmix_alpha"),
    ({"num_classes": 3, "mixup_alpha": -1.0}, "alpha"),
    ({"num_classes": 3, "mixup_alpha": 0.2, "cutmix_prob": 1.5}, "cutmix_prob"),
])
def test_refuses_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MixUpCutMix(**kwargs)
