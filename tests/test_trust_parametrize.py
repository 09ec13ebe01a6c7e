"""Parametrized weights (torch.nn.utils.parametrize / weight_norm) compile exactly: the parametrized layer is no block
(its weight is computed), its original parameters take the backward's gradient through the outer optimizer, and one
T=1 GD step equals torch.optim.SGD's (float64). Before, transform crashed with a raw AttributeError."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations as P
from torch.nn.utils import parametrize

from test_trust_addmm import _identity


class _Scale(nn.Module):
    def forward(self, w):
        return 2.0 * w


FORMS = {
    "weight_norm": lambda l: P.weight_norm(l),
    "orthogonal": lambda l: P.orthogonal(l),
    "register_parametrization": lambda l: parametrize.register_parametrization(l, "weight", _Scale()) or l,
    "old_weight_norm": lambda l: torch.nn.utils.weight_norm(l),
    "spectral_norm_eval": lambda l: P.spectral_norm(l).eval(),  # eval: no power iteration, a fixed u, v
    "old_spectral_norm_eval": lambda l: torch.nn.utils.spectral_norm(l).eval(),  # the hook form, eval: σ = uᵀWv
}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("form", list(FORMS))
def test_a_parametrized_layer_is_no_block_and_the_step_is_sgds(form):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), FORMS[form](nn.Linear(5, 3))).double()
    if form in ("old_weight_norm", "old_spectral_norm_eval"):  # their cached weight is a non-leaf the oracle's
        del model[2].weight                                      # deepcopy refuses; the hook remakes it
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    prog = _identity(model, (x,), y, F.mse_loss)
    assert [b.name for b in prog.blocks] == ["0"]
    # the old weight_norm is a forward pre-hook: traced through, its layer is a linear op on a computed weight,
    # named by the matmul-fed warning instead of the parametrization note
    assert any("computed weight" in w or (form.startswith("old_") and "'2." in w) for w in prog.warnings)


def test_spectral_norm_in_training_mode_is_refused_by_name():
    from lwcompile.errors import PartitionError
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), P.spectral_norm(nn.Linear(5, 3)))
    with pytest.raises(PartitionError, match="module '2' uses spectral_norm in training mode"):
        import lwcompile
        lwcompile.transform(model, F.mse_loss, (torch.randn(6, 4),))


def test_the_hook_based_spectral_norm_in_training_mode_is_refused_by_name():
    """torch.nn.utils.spectral_norm (a forward pre-hook, not a parametrization) runs a power iteration that updates
    weight_u/weight_v in place at every training-mode call; before, transform compiled it and the step trained a
    weight normalized by one frozen iteration (with only warnings). Refused at transform, and when the model is
    put back in training mode after an eval-mode transform."""
    import lwcompile
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), torch.nn.utils.spectral_norm(nn.Linear(5, 3)))
    x, y = torch.randn(6, 4), torch.randn(6, 3)
    msg = r"module '2' \(Linear\) uses the hook-based torch.nn.utils.spectral_norm.*parametrizations.spectral_norm"
    with pytest.raises(lwcompile.LwcompileError, match=msg):
        lwcompile.transform(model, F.mse_loss, (x,))
    model.eval()
    prog = lwcompile.transform(model, F.mse_loss, (x,))
    prog.step(x, y)  # eval mode: compiled (its exactness is the SGD identity above)
    model.train()
    u = model[2].weight_u.clone()
    with pytest.raises(lwcompile.LwcompileError, match=msg):
        prog.step(x, y)
    assert torch.equal(model[2].weight_u, u)  # refused before anything ran
