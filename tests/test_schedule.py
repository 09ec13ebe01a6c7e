"""The inner learning rate's schedule (Config's inner_lr_warmup_* / inner_lr_anneal* / inner_lr_schedule_every):
its factors against closed forms and the paper's official per-epoch formula, the graphs receiving it, and how the
``prog.inner_lr`` setter composes with it."""
import math

import pytest
import torch
import torch.nn.functional as F

import lwcompile
from lwcompile.experiments.models import bce_sum, deep_autoencoder, reference_schedule
from lwcompile.schedule import schedule_factor


def official(epoch: int, warmup: int, total: int) -> float:
    """The official LocoProp code's per-epoch lr factor, written out independently."""
    if epoch < warmup:
        return epoch / warmup
    return max(1.0 - (epoch + 1 - warmup) / (total - warmup), 0.0)


@pytest.mark.parametrize("per_epoch, warmup, total", [(1, 5, 100), (3, 5, 100), (7, 0, 10), (2, 5, 10)])
def test_reference_schedule_is_the_official_one_bit_for_bit(per_epoch, warmup, total):
    cfg = lwcompile.Config(**reference_schedule(per_epoch, warmup, total))
    for s in range(per_epoch * (total + 3)):
        assert schedule_factor(cfg, s) == official(s // per_epoch, warmup, total), s


def test_warmup_start_and_cosine_annealing_closed_forms():
    cfg = lwcompile.Config(inner_lr_warmup_steps=4, inner_lr_warmup_start=0.2, inner_lr_anneal="cosine",
                           inner_lr_anneal_steps=5, inner_lr_anneal_end=0.1)
    got = [schedule_factor(cfg, s) for s in range(12)]
    warm = [0.2 + 0.8 * q / 4 for q in range(4)]
    anneal = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(d / 5, 1.0))) for d in range(1, 9)]
    assert got == pytest.approx(warm + anneal, abs=1e-15)
    assert got[8:] == [pytest.approx(0.1)] * 4
    assert [schedule_factor(lwcompile.Config(), s) for s in (0, 1, 10 ** 9)] == [1.0, 1.0, 1.0]


def _program(schedule: dict) -> tuple[torch.nn.Module, lwcompile.Program]:
    model = deep_autoencoder((12, 6, 3, 6, 12), seed=0, output_sigmoid=True)
    cfg = lwcompile.Config(steps=3, inner_optimizer="rmsprop_tf1", momentum=0.999, decay=0.9, eps=1e-5,
                           inner_lr=1e-3, inner_lr_decay=True, **schedule)
    return model, lwcompile.transform(model, bce_sum, torch.zeros(10, 12), cfg)


def test_the_graphs_get_the_scheduled_lr_exactly_as_when_set_by_hand():
    """The paper example's old way (prog.inner_lr = base × factor before each epoch) and the Config fields give
    bit-identical weights, the lr-0 first epoch included."""
    g = torch.Generator().manual_seed(0)
    data = [torch.rand(10, 12, generator=g) for _ in range(9)]
    fields = reference_schedule(steps_per_epoch=2, warmup_epochs=2, num_epochs=5)
    model_a, by_config = _program(fields)
    model_b, by_hand = _program({})
    for s, x in enumerate(data):
        by_hand.inner_lr = 1e-3 * official(s // 2, 2, 5)
        assert by_config.effective_inner_lr == by_hand.inner_lr
        assert by_config.step(x, x) == by_hand.step(x, x)
    for (n, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), n
    assert by_config.inner_lr == 1e-3  # the base is untouched by the schedule


def test_the_setter_changes_the_base_the_schedule_multiplies():
    model, prog = _program(dict(inner_lr_warmup_steps=4, inner_lr_warmup_start=0.5))
    assert prog.effective_inner_lr == 1e-3 * 0.5
    prog.inner_lr = 4e-3
    assert (prog.inner_lr, prog.effective_inner_lr) == (4e-3, 4e-3 * 0.5)
    x = torch.rand(10, 12)
    prog.step(x, x)
    assert prog.effective_inner_lr == 4e-3 * (0.5 + 0.5 * 1 / 4)
    with pytest.raises(lwcompile.ConfigError, match="inner_lr"):
        prog.inner_lr = float("inf")


@pytest.mark.parametrize("field, value", [
    ("inner_lr_warmup_steps", -1), ("inner_lr_warmup_steps", 2.5), ("inner_lr_warmup_steps", True),
    ("inner_lr_warmup_start", 1.5), ("inner_lr_warmup_start", float("nan")), ("inner_lr_anneal", "step"),
    ("inner_lr_anneal_end", -0.1), ("inner_lr_schedule_every", 0), ("inner_lr_anneal_steps", -3),
])
def test_bad_schedule_fields_are_refused_by_name(field, value):
    with pytest.raises(lwcompile.ConfigError, match=field):
        lwcompile.Config(**{field: value})


def test_annealing_needs_a_length():
    with pytest.raises(lwcompile.ConfigError, match="inner_lr_anneal_steps >= 1"):
        lwcompile.Config(inner_lr_anneal="linear")
    with pytest.raises(lwcompile.ConfigError, match="unknown Config field"):
        lwcompile.transform(torch.nn.Linear(2, 2), F.mse_loss, torch.zeros(3, 2), inner_lr_decay_steps=5)
