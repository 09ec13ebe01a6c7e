"""Bad input meets a clear exception naming the problem, and the model is left exactly as it was."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lwcompile
from lwcompile import ConfigError, LossError, NonFiniteError, PartitionError, TraceError


def _mlp():
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2))


def _state(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _unchanged(m, before):
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"


def test_model_without_a_block_is_rejected():
    with pytest.raises(PartitionError, match="no block"):
        lwcompile.transform(nn.Sequential(nn.BatchNorm1d(4), nn.ReLU()), F.mse_loss, torch.randn(3, 4))


@pytest.mark.parametrize("field,value,match", [
    ("target", "sgd", "target"), ("local_loss", "l1", "local_loss"), ("gamma", -1.0, "gamma"),
    ("steps", 0, "steps"), ("inner_optimizer", "lbfgs", "inner_optimizer"), ("inner_lr", float("nan"), "inner_lr"),
    ("outer_optimizer", "magic", "outer_optimizer"), ("momentum", 1.5, "momentum"), ("betas", (0.9,), "betas"),
])
def test_unknown_or_bad_config_values_name_the_field(field, value, match):
    with pytest.raises(ConfigError, match=match):
        lwcompile.Config(**{field: value})


def test_mismatched_target_and_loss_spaces_are_rejected():
    with pytest.raises(ConfigError, match="squared_pre"):
        lwcompile.Config(target="gd_pre", local_loss="matching")


def test_unknown_transform_keyword_is_rejected():
    with pytest.raises(ConfigError, match="gama"):
        lwcompile.transform(_mlp(), F.mse_loss, torch.randn(3, 4), gama=1.0)


def test_non_scalar_loss_is_rejected_and_model_unchanged():
    m = _mlp()
    before = _state(m)
    prog = lwcompile.transform(m, lambda o, y: (o - y) ** 2, torch.randn(5, 4))
    with pytest.raises(LossError, match="not a scalar"):
        prog.step(torch.randn(5, 4), torch.randn(5, 2))
    _unchanged(m, before)


def test_nan_loss_raises_and_leaves_parameters_and_buffers_unchanged():
    m = _mlp()
    prog = lwcompile.transform(m, F.mse_loss, torch.randn(5, 4))
    before = _state(m)
    with pytest.raises(NonFiniteError, match="task loss"):
        prog.step(torch.randn(5, 4), torch.full((5, 2), float("nan")))
    _unchanged(m, before)


def test_nan_target_with_finite_loss_raises_naming_the_block():
    m = _mlp()
    prog = lwcompile.transform(m, lambda o, y: torch.sqrt(((o - y) * 0).sum()), torch.randn(5, 4))
    before = _state(m)
    with pytest.raises(NonFiniteError, match="target of block '0'"):
        prog.step(torch.randn(5, 4), torch.randn(5, 2))
    _unchanged(m, before)


def test_a_module_called_twice_is_one_block_and_skip_still_hands_it_to_the_outer_optimizer():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            return self.out(torch.tanh(self.fc(torch.tanh(self.fc(x)))))

    prog = lwcompile.transform(Tied(), F.mse_loss, torch.randn(3, 4))
    assert [b.name for b in prog.blocks] == ["fc", "out"] and set(prog.nonblock) == {"fc.weight", "fc.bias"}
    assert any("tied" in w for w in prog.warnings)
    m = Tied()
    prog = lwcompile.transform(m, F.mse_loss, torch.randn(3, 4), skip=("fc",))
    assert [b.name for b in prog.blocks] == ["out"] and set(prog.nonblock) == {"fc.weight", "fc.bias"}
    before = m.fc.weight.detach().clone()
    prog.step(torch.randn(3, 4), torch.randn(3, 2))
    assert not torch.equal(before, m.fc.weight)  # trained once, by the outer optimizer


def test_skip_patterns_match_class_names():
    m = nn.Sequential(nn.Conv1d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4, 2))
    prog = lwcompile.transform(m, F.mse_loss, torch.randn(4, 2, 6), skip=("Conv1d",))
    assert [b.name for b in prog.blocks] == ["3"] and "0.weight" in prog.nonblock


def test_unknown_elementwise_op_becomes_identity_with_a_warning_naming_the_node():
    m = nn.Sequential(nn.Linear(4, 4), nn.Tanhshrink(), nn.Linear(4, 2))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        prog = lwcompile.transform(m, F.mse_loss, torch.randn(3, 4))
    assert any("Tanhshrink" in str(x.message) and "identity" in str(x.message) for x in w)
    assert prog.blocks[0].transfer == "identity"


def test_untraceable_model_names_both_front_ends():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            if x.sum().item() > 0:  # data-dependent: neither tracer can capture it
                return self.fc(x)
            return self.fc(-x) * float(x.abs().max().item())

    with pytest.raises(TraceError, match="symbolic_trace.*\n.*torch.export"):
        lwcompile.transform(Bad(), F.mse_loss, torch.ones(2, 3), frontend="auto")


def test_target_graph_before_first_step_explains_what_to_do():
    prog = lwcompile.transform(_mlp(), F.mse_loss, torch.randn(5, 4))
    with pytest.raises(lwcompile.LwcompileError, match="step"):
        prog.target_graph
    g = prog.build_target_graph(torch.randn(5, 2))
    assert "aten" in g.code


def test_partition_postcondition_catches_misread_conv_attributes():
    from dataclasses import replace

    from lwcompile.passes.checks import ensures_partition
    from lwcompile.passes.partition import Partition, partition
    from lwcompile.passes.trace import trace

    m = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2), nn.ReLU())
    x = torch.randn(2, 1, 7, 7)
    gm = trace(m, (x,)).graph_module
    part = partition(gm, (x,))
    ensures_partition(gm, part)
    bad = replace(part.blocks[0], attrs=tuple((k, (1, 1) if k == "stride" else v) for k, v in part.blocks[0].attrs))
    with pytest.raises(PartitionError, match="block '0'.*attributes"):
        ensures_partition(gm, Partition((bad,), part.nonblock, part.edges, part.warnings))
