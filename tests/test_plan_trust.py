"""A plan can be trusted: making one leaves the user's RNG alone, names only devices this machine has, and prints
every block name whole."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lwcompile
from lwcompile.errors import ConfigError
from lwcompile.ir import Block
from lwcompile.runtime import costs as costs_mod
from lwcompile.runtime.costs import measure_device_rate
from lwcompile.runtime.local import run_jobs
from lwcompile.runtime.placement import make_plan

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


def fake_block(name: str, n: int = 8) -> Block:
    return Block(name, name, "linear", (), "relu", (), f"{name}.weight", None, (n, n), None, (4, n), (4, n), 2 * n * n)


@pytest.fixture
def prog():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2))
    return lwcompile.transform(model, F.mse_loss, torch.randn(6, 4), steps=2)


@pytest.fixture
def fresh_rate_cache():
    measure_device_rate.cache_clear()  # so that the call under test really measures
    yield
    measure_device_rate.cache_clear()


# ------------------------------------------------------------------------------------------------------ RNG
def test_plan_and_the_rate_probe_leave_the_global_rng_state_unchanged(prog, fresh_rate_cache):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    prog.plan(devices=2)  # device_rate=None: measures the CPU
    assert measure_device_rate.cache_info().misses == 1  # it did measure
    assert torch.equal(torch.get_rng_state(), state)
    measure_device_rate.cache_clear()
    measure_device_rate("cpu", 64, 3)
    assert torch.equal(torch.get_rng_state(), state)


def test_random_draws_and_dropout_masks_do_not_depend_on_whether_a_plan_was_made(prog, fresh_rate_cache):
    torch.manual_seed(7)
    without = torch.rand(1000), F.dropout(torch.ones(1000), 0.5)
    torch.manual_seed(7)
    prog.plan(devices=3, mode="partitioned")
    with_plan = torch.rand(1000), F.dropout(torch.ones(1000), 0.5)
    assert torch.equal(without[0], with_plan[0]) and torch.equal(without[1], with_plan[1])


def test_the_rate_is_measured_once_per_process(prog, fresh_rate_cache):
    prog.plan(devices=2)
    prog.plan(devices=3)
    info = measure_device_rate.cache_info()
    assert (info.misses, info.hits) == (1, 1)


def test_the_rate_is_the_median_timing_so_one_outlier_does_not_set_it(fresh_rate_cache, monkeypatch):
    durations = [5.0, 1.0, 2.0, 3.0, 4.0, 100.0, 0.001, 2.0, 3.0]  # median 3.0; the best (0.001) is a fluke
    ticks, now = [], 0.0
    for d in durations:  # start and end of each timed matmul
        ticks += [now, now + d]
        now += d + 1.0
    clock = iter(ticks)
    monkeypatch.setattr(costs_mod, "_clock", lambda: next(clock))
    rate = measure_device_rate("cpu", 16, len(durations))
    assert rate == pytest.approx(2.0 * 16**3 / 3.0)


# -------------------------------------------------------------------------------------------------- devices
@no_cuda
def test_plan_refuses_cuda_devices_on_a_machine_without_cuda(prog):
    with pytest.raises(ConfigError) as err:
        prog.plan(devices=["cuda:0", "cuda:1"])
    msg = str(err.value)
    assert "'cuda:0'" in msg and "not available" in msg and "sim:N" in msg and "int" in msg


def test_plan_refuses_a_cuda_index_beyond_the_device_count(prog, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"'cuda:1'.*only 1 CUDA device"):
        prog.plan(devices=["cuda:0", "cuda:1"])


def test_simulated_devices_and_the_cpu_are_always_accepted(prog):
    assert prog.plan(devices=["cpu", "sim:1"]).devices == ("cpu", "sim:1")
    assert prog.plan(devices=2).devices == ("sim:0", "sim:1")


def test_make_plan_can_still_plan_for_another_machine_when_asked():
    plan = make_plan([fake_block("a"), fake_block("b")], [], 1, ["cuda:0", "cuda:7"], device_rate=1e9,
                     check_devices=False)
    assert plan.devices == ("cuda:0", "cuda:7")


@no_cuda
def test_a_step_assigning_blocks_to_a_missing_gpu_is_refused_before_any_work(prog):
    x, y = torch.randn(6, 4), torch.randn(6, 2)
    before = {k: v.clone() for k, v in prog.model.state_dict().items()}
    count = prog.step_count
    names = [b.name for b in prog.blocks]
    with pytest.raises(ConfigError, match=r"'cuda:0'.*not available"):
        prog.step(x, y, assignment={"sim:0": names[:1], "cuda:0": names[1:]})
    after = prog.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BatchNorm statistics
    assert prog.step_count == count


@no_cuda
def test_run_jobs_runs_nothing_when_a_device_does_not_exist():
    ran = []

    def job(tag):
        return lambda t: (ran.append(tag) or t + 1,)

    jobs = {"a": (job("a"), (torch.zeros(2),)), "b": (job("b"), (torch.zeros(2),))}
    with pytest.raises(ConfigError, match="'cuda:3'"):
        run_jobs(jobs, {"sim:0": ["a"], "cuda:3": ["b"]})
    with pytest.raises(ConfigError, match="'gpu0'"):
        run_jobs(jobs, {"cpu": ["a"], "gpu0": ["b"]})
    assert ran == []


# ---------------------------------------------------------------------------------------------------- table
def test_the_plan_table_prints_every_block_name_whole():
    long = ["encoder.layers.11.self_attention.in_proj", "encoder.layers.11.self_attention.out_proj",
            "decoder.layers.0.cross_attention_with_an_unusually_long_module_path.out_proj"]
    short = [f"head.fc{i}" for i in range(20)]
    plan = make_plan([fake_block(n) for n in long + short], [], 1, 2, device_rate=1e9)
    text = str(plan)
    assert "…" not in text and "..." not in text
    tokens = set(re.findall(r"[\w.]+", text))
    for name in long + short:
        assert name in tokens, name  # as a whole token: not cut, not glued to a neighbour
    for device, blocks in plan.assignment.items():  # each device's blocks, in run order, under that device
        section = text.split(device, 1)[1]
        positions = [re.search(rf"(?<![\w.]){re.escape(b)}(?![\w.])", section).start() for b in blocks]
        assert positions == sorted(positions)


def test_long_block_names_sharing_one_device_are_whole_in_the_table():
    names = ["encoder.layers.11.self_attention.in_proj", "encoder.layers.11.self_attention.out_proj"]
    text = str(make_plan([fake_block(n) for n in names], [], 1, 1, device_rate=1e9))
    for name in names:
        assert name in text
