"""Specification of ``lwcompile train``: a run stopped after k steps (``--stop-after``, one Ctrl-C, or a second
Ctrl-C that abandons a step) and resumed from its checkpoint writes exactly the curve — and ends with exactly the
weights — of the run that never stopped; outputs are never overwritten by accident; a bad job is refused clearly."""
from __future__ import annotations

import textwrap

import pytest
import torch

import lwcompile
from lwcompile.cli import main
from lwcompile.train import TrainOptions, train
from lwcompile.train_output import read_csv

JOBS = textwrap.dedent("""
    import os, signal
    import torch
    from torch import nn
    import lwcompile

    def _data():
        g = torch.Generator().manual_seed(1)
        x = torch.randn(40, 6, generator=g)
        return x, torch.tanh(x @ torch.randn(6, 3, generator=g))

    def _model():
        # Dropout draws from the global RNG inside every step: resuming must restore it too.
        return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Dropout(0.2), nn.Linear(12, 3))

    CONFIG = lwcompile.Config(inner_optimizer="adam", inner_lr=1e-2, steps=3)

    def tensors(sigint_at_eval=0):
        x, y = _data()
        def kill_at(model, state={"evals": 0}):
            state["evals"] += 1
            if state["evals"] == sigint_at_eval:
                os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, delivered while a step's evaluation runs
            return {"w_norm": float(model[0].weight.norm())}
        return lwcompile.TrainJob(_model(), nn.functional.mse_loss, (x, y), batch_size=8, eval_data=(x[:16], y[:16]),
                                  eval_fn=kill_at, config=CONFIG)

    def loader():
        x, y = _data()
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=True)
        return lwcompile.TrainJob(_model(), nn.functional.mse_loss, data, config=CONFIG)

    class TwoCtrlC:
        # A re-iterable of 5 batches whose loading of batch `at` gets two Ctrl-Cs: the second abandons the step.
        def __init__(self, at):
            self.x, self.y = _data()
            self.at = at
        def __len__(self):
            return 5
        def __iter__(self):
            perm = torch.randperm(40)  # from the global RNG, as a DataLoader's shuffle is
            for i in range(5):
                if i == self.at:
                    os.kill(os.getpid(), signal.SIGINT)
                    os.kill(os.getpid(), signal.SIGINT)
                    self.at = -1  # only once
                rows = perm[8 * i: 8 * i + 8]
                yield self.x[rows], self.y[rows]

    def abandon(at=-1):
        return lwcompile.TrainJob(_model(), nn.functional.mse_loss, TwoCtrlC(at), config=CONFIG)

    def not_a_job():
        return _model()
""")

STEPS = 13  # 5 batches per epoch: crosses two epoch boundaries


@pytest.fixture
def jobs(tmp_path):
    path = tmp_path / "jobs.py"
    path.write_text(JOBS)
    return path


def _run(jobs, name, out, *extra, args=()):
    argv = ["train", f"{jobs}:{name}", "--out", str(out), "--no-progress", *extra]
    for a in args:
        argv += ["--arg", a]
    return main(argv)


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


def _same_run(a, b):
    """Both runs' curves are equal as text (every float written exactly) and their final weights bitwise."""
    assert (a / "curve.csv").read_text() == (b / "curve.csv").read_text()
    wa, wb = _weights(a / "checkpoint.pt"), _weights(b / "checkpoint.pt")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("factory,stop", [
    ("tensors", ["--stop-after", "7"]),   # mid-epoch
    ("loader", ["--stop-after", "8"]),    # a shuffling DataLoader: its order comes from the global RNG
    ("tensors", "sigint"),                # a real SIGINT at an epoch's end: the step finishes, then the run stops
])
def test_a_stopped_and_resumed_run_writes_the_uninterrupted_curve(jobs, tmp_path, factory, stop, capsys):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert _run(jobs, factory, whole, "--steps", str(STEPS), "--eval-every", "3") == 0
    curve = read_csv(whole / "curve.csv")
    losses = [float(r["loss"]) for r in curve if r["loss"]]
    assert len(losses) == STEPS and len(set(losses)) == STEPS  # a real curve: every step's loss differs
    evaluated = [int(r["step"]) for r in curve if r.get("eval_loss")]
    if factory == "tensors":  # before training, every 3 steps, at each epoch's end (5, 10) and at the last step
        assert evaluated == [0, 3, 5, 6, 9, 10, 12, 13]
        assert float(curve[-1]["eval_loss"]) < float(curve[0]["eval_loss"])

    if stop == "sigint":
        # evaluations run before step 1 and after steps 3, 5, 6, ...: the 3rd is step 5's, the epoch's last
        rc = _run(jobs, factory, parts, "--steps", str(STEPS), "--eval-every", "3", args=["sigint_at_eval=3"])
        k = 5
    else:
        rc = _run(jobs, factory, parts, "--steps", str(STEPS), "--eval-every", "3", *stop)
        k = int(stop[1])
    assert rc == 130 and "--resume" in capsys.readouterr().err
    assert [int(r["step"]) for r in read_csv(parts / "curve.csv")][-1] == k
    # resume with no options at all: --steps and --eval-every come from the checkpoint
    assert main(["train", f"{jobs}:{factory}", "--resume", str(parts / "checkpoint.pt"), "--no-progress"]) == 0
    _same_run(whole, parts)


def test_a_second_ctrl_c_abandons_the_step_and_the_run_still_resumes_exactly(jobs, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert _run(jobs, "abandon", whole, "--steps", "12") == 0
    # Two Ctrl-Cs while batch 3 loads: steps 1..3 are done, step 4 never starts.
    assert _run(jobs, "abandon", parts, "--steps", "12", args=["at=3"]) == 130
    assert [int(r["step"]) for r in read_csv(parts / "curve.csv")] == [1, 2, 3]
    assert _run(jobs, "abandon", parts, "--resume", str(parts / "checkpoint.pt")) == 0
    _same_run(whole, parts)


def test_existing_outputs_are_never_replaced_unless_asked(jobs, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "curve.csv").write_text("my own file\n")
    assert _run(jobs, "tensors", out, "--steps", "2") == 1
    assert "already exist" in capsys.readouterr().err and (out / "curve.csv").read_text() == "my own file\n"
    assert _run(jobs, "tensors", out, "--steps", "2", "--overwrite") == 0
    assert len(read_csv(out / "curve.csv")) == 3 and (out / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "curve.csv", "curve.png"]  # no temp files
    other = tmp_path / "other"
    other.mkdir()
    (other / "curve.png").write_bytes(b"mine")
    # resuming writes into the checkpoint's own directory freely, but into another one only where nothing is
    assert _run(jobs, "tensors", other, "--resume", str(out / "checkpoint.pt"), "--steps", "4") == 1
    assert (other / "curve.png").read_bytes() == b"mine"
    assert main(["train", f"{jobs}:tensors", "--resume", str(out / "checkpoint.pt"), "--steps", "4",
                 "--no-progress"]) == 0
    assert [r["step"] for r in read_csv(out / "curve.csv")] == ["0", "1", "2", "3", "4"]


@pytest.mark.parametrize("argv,message,status", [
    (["{jobs}:not_a_job"], "must return an lwcompile.TrainJob", 1),
    (["{jobs}:tensors", "--arg", "nope=1"], "check the --arg names", 1),
    (["{jobs}:tensors", "--config", "inner_lr=-1"], "Config.inner_lr=-1", 1),
    (["{jobs}:tensors", "--resume", "{tmp}/missing.pt"], "missing.pt: no such file", 2),  # an unusable file: 2
])
def test_bad_jobs_and_options_are_refused_clearly(jobs, tmp_path, capsys, argv, message, status):
    argv = [a.format(jobs=jobs, tmp=tmp_path) for a in argv]
    assert main(["train", *argv, "--out", str(tmp_path / "o"), "--no-progress"]) == status
    assert message in capsys.readouterr().err


def test_train_job_and_its_data_are_checked_before_anything_runs(tmp_path):
    x = torch.randn(10, 2)
    model = torch.nn.Linear(2, 1)
    with pytest.raises(lwcompile.ConfigError, match="nn.Module"):
        lwcompile.TrainJob("model", torch.nn.functional.mse_loss, (x, x))
    bad = {"batch_size must be an int >= 1": dict(train_data=(x, x[:, :1])),  # tensors need a batch size
           "same number of examples": dict(train_data=(x, x[:5]), batch_size=2),
           "an iterator": dict(train_data=iter([(x, x[:, :1])])),
           "a re-iterable with a len": dict(train_data=5)}
    for message, fields in bad.items():
        job = lwcompile.TrainJob(model, torch.nn.functional.mse_loss, **fields)
        with pytest.raises(lwcompile.ConfigError, match=message):
            train(job, TrainOptions(out_dir=tmp_path, progress=False))
    assert list(tmp_path.iterdir()) == []  # refused before writing anything
