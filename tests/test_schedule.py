"""The recipes' learning-rate schedules, step by step through the scheduler train.py builds, against each source's
own formula written out here (not la.build's)."""
import math

import pytest
import torch

from la import UserError, build, config, rundir

STEPS_PER_EPOCH = 7  # any count: the formulas below are per epoch or per step of it


def rates(recipe, epochs):
    """optim.lr x the factor of every step 0 .. epochs * STEPS_PER_EPOCH - 1, from la.build.scheduler."""
    cfg = config.build(config.CONFIG_DIR / recipe)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.optim.lr)
    sched = build.scheduler(cfg, opt, STEPS_PER_EPOCH)
    out = []
    for _ in range(epochs * STEPS_PER_EPOCH):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def cao_lr(epoch):
    """kaidic/LDAM-DRW cifar_train.py adjust_learning_rate, epoch counted from 0 as its loop passes it."""
    epoch = epoch + 1
    if epoch <= 5:
        return 0.1 * epoch / 5
    if epoch > 180:
        return 0.1 * 0.0001
    if epoch > 160:
        return 0.1 * 0.01
    return 0.1


def paper_lr(step):
    """The paper recipe (docs/reference.md): linear warm-up per step over 5 epochs, then x0.1 at 160 and 180."""
    epoch = step // STEPS_PER_EPOCH
    if epoch < 5:
        return 0.1 * (step + 1) / (5 * STEPS_PER_EPOCH)
    return 0.1 * 0.1 ** ((epoch >= 160) + (epoch >= 180))


@pytest.mark.parametrize("recipe", ["cao_cifar10.yaml", "cao_cifar100.yaml"])
def test_cao_schedule_is_ldam_drw_s_per_epoch_rate(recipe):
    lr = rates(recipe, 200)
    boundaries = [0, 1, 3, 4, 5, 6, 159, 160, 161, 179, 180, 181, 199]
    for epoch in boundaries:
        for step in (epoch * STEPS_PER_EPOCH, (epoch + 1) * STEPS_PER_EPOCH - 1):  # first and last step of the epoch
            assert lr[step] == pytest.approx(cao_lr(epoch), rel=1e-12), (epoch, step)
    # the paper recipe decays by 10x, not 100x: the two schedules differ after epoch 160
    assert lr[161 * STEPS_PER_EPOCH] == pytest.approx(1e-3) and lr[185 * STEPS_PER_EPOCH] == pytest.approx(1e-5)


def test_paper_schedule_warms_up_per_step_and_decays_tenfold():
    lr = rates("paper_cifar10.yaml", 200)
    for step in [0, 1, 5 * STEPS_PER_EPOCH - 1, 5 * STEPS_PER_EPOCH, 160 * STEPS_PER_EPOCH - 1,
                 160 * STEPS_PER_EPOCH, 180 * STEPS_PER_EPOCH - 1, 180 * STEPS_PER_EPOCH, 200 * STEPS_PER_EPOCH - 1]:
        assert lr[step] == pytest.approx(paper_lr(step), rel=1e-12), step


def test_warmup_from_zero_starts_at_rate_zero():
    optim = config.Optim(warmup_epochs=2, warmup_by="step_from_zero")
    factors = [build.lr_factor(s, 4, optim) for s in range(10)]
    assert factors == pytest.approx([0, 1 / 8, 2 / 8, 3 / 8, 4 / 8, 5 / 8, 6 / 8, 7 / 8, 1, 1])


def official_lr(step, schedule):
    """The authors' TF code, logit_adjustment/utils.py LearningRateSchedule with base 0.1: the step counts from 0,
    lr_epoch = step / steps_per_epoch; linear from 0 to the first entry's epoch, then base * mult from each
    (mult, start_epoch) with lr_epoch >= start_epoch."""
    lr_epoch = step / STEPS_PER_EPOCH
    mult, warmup_end = schedule[0]
    lr = 0.1 * mult * lr_epoch / warmup_end
    for mult, start in schedule:
        if lr_epoch >= start:
            lr = 0.1 * mult
    return lr


OFFICIAL = {  # utils.py dataset_mappings: (epochs, [(multiplier, epoch to start), ...])
    "official_cifar10.yaml": (1241, [(1.0, 20), (0.1, 604), (0.01, 926), (0.001, 1128)]),
    "official_cifar100.yaml": (1419, [(1.0, 22), (0.1, 691), (0.01, 1059), (0.001, 1290)]),
}


@pytest.mark.parametrize("recipe", sorted(OFFICIAL))
def test_official_schedule_is_the_tf_codes_step_by_step(recipe):
    epochs, schedule = OFFICIAL[recipe]
    assert config.build(config.CONFIG_DIR / recipe).train.epochs == epochs
    lr = rates(recipe, epochs)
    assert len(lr) == epochs * STEPS_PER_EPOCH and lr[0] == 0.0
    around = [0, 1, 2, STEPS_PER_EPOCH, len(lr) - 1]
    for _, start in schedule:  # the last steps before each boundary and the first after it
        around += [start * STEPS_PER_EPOCH + d for d in (-2, -1, 0, 1)]
    for step in around:
        assert lr[step] == pytest.approx(official_lr(step, schedule), rel=1e-12, abs=1e-15), step
    # and everywhere, to float rounding (0.1 x 0.1 x 0.1 is not 0.001 exactly)
    assert lr == pytest.approx([official_lr(s, schedule) for s in range(len(lr))], rel=1e-12, abs=1e-15)


def app_d_imagenet_lr(step, epochs=90):
    """Menon et al. App. D (docs/reference.md): 5 epochs of linear warm-up to 0.4, then cosine decay to 0 at the end
    of training, per step."""
    warm = 5 * STEPS_PER_EPOCH
    if step < warm:
        return 0.4 * (step + 1) / warm
    return 0.4 * 0.5 * (1 + math.cos(math.pi * (step - warm) / (epochs * STEPS_PER_EPOCH - warm)))


@pytest.mark.parametrize("recipe", ["imagenet_lt.yaml", "inat2018.yaml"])
def test_imagenet_and_inaturalist_recipes_warm_up_then_decay_on_a_cosine(recipe):
    lr = rates(recipe, 90)
    n = 90 * STEPS_PER_EPOCH
    for step in [0, 1, 5 * STEPS_PER_EPOCH - 1, 5 * STEPS_PER_EPOCH, 5 * STEPS_PER_EPOCH + 1, 30 * STEPS_PER_EPOCH,
                 (n + 5 * STEPS_PER_EPOCH) // 2, 89 * STEPS_PER_EPOCH, n - 1]:
        assert lr[step] == pytest.approx(app_d_imagenet_lr(step), rel=1e-12, abs=1e-15), step
    assert lr[5 * STEPS_PER_EPOCH] == pytest.approx(0.4) and lr[-1] < 1e-4  # the peak, and nearly 0 at the end
    cfg = config.build(config.CONFIG_DIR / recipe)
    assert cfg.model.name == "resnet50" and cfg.train.batch_size == 512 and cfg.data.image_size == 224


def test_cosine_with_milestones_is_refused_in_one_line():
    with pytest.raises(UserError, match=r"optim.milestones \[60\] are for optim.schedule=step"):
        config.build(overrides=[("optim.schedule", "cosine"), ("optim.milestones", "[60]")])


def test_a_cosine_run_resumes_longer_only_before_it_has_begun():
    # the cosine decays to 0 at train.epochs: resuming with another --epochs would change the learning rate of
    # every remaining step, so it is refused once training has begun; a step schedule may run longer
    cosine = [("optim.schedule", "cosine"), ("optim.milestones", [])]
    saved = config.to_dict(config.build(overrides=cosine))
    longer = config.build(overrides=cosine + [("train.epochs", 300)])
    rundir.check_resumable(longer, saved, 0)
    with pytest.raises(UserError, match="train.epochs=200"):
        rundir.check_resumable(longer, saved, 1)
    rundir.check_resumable(config.build(overrides=[("train.epochs", 300)]), config.to_dict(config.build()), 150)
