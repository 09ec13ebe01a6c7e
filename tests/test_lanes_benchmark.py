"""``benchmarks/lanes.py``'s lane runner: blocks run in lanes (threads, one intra-op thread each) give bitwise the
same step as running them one after another (the inner graphs are pure and independent), and the process's
intra-op thread count, as the main thread and newly started threads see it, is what it was before."""
from __future__ import annotations

import importlib.util
import sys
import threading
from pathlib import Path

import torch

import lwcompile

ROOT = Path(__file__).resolve().parent.parent


def _load():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("bench_lanes", ROOT / "benchmarks" / "lanes.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def _threads_seen_by_a_new_thread() -> int:
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    return seen[0]


def _program(seed: int) -> lwcompile.Program:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 3))
    return lwcompile.transform(model, torch.nn.functional.mse_loss, (torch.randn(32, 6),), lwcompile.Config())


def test_lanes_equal_sequential_bitwise_and_restore_thread_count():
    bench = _load()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 6, generator=g), torch.randn(32, 3, generator=g)
    seq, lanes = _program(0), _program(0)
    runner = bench.LaneRunner(lanes.plan(2, device_rate=1e9).assignment, threads=1)
    assert len(runner.groups) == 2
    before, before_new = torch.get_num_threads(), _threads_seen_by_a_new_thread()
    for _ in range(3):
        assert seq.step(x, y) == lanes.step(x, y, runner=runner)
    for p, q in zip(seq.model.parameters(), lanes.model.parameters()):
        assert torch.equal(p, q)
    assert seq.step_count == lanes.step_count == 3
    assert (torch.get_num_threads(), _threads_seen_by_a_new_thread()) == (before, before_new)
