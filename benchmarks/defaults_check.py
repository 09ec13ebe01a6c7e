"""Check the Config() defaults beyond the MNIST autoencoder: old (the paper's T = 10, γ = 10, inner lr 1e-5) against
new (T = 3, γ = 30, inner lr 1e-4) LocoProp-M on four scikit-learn digits models, 150 steps of batch 128 from the same
init and batches; prints the full-set task loss after the run and the seconds each took (one thread).

    python benchmarks/defaults_check.py
"""
import torch, time, lwcompile, torch.nn as nn, torch.nn.functional as F
from sklearn.datasets import load_digits
torch.set_num_threads(1)
X, y = load_digits(return_X_y=True); X = torch.tensor(X / 16.0, dtype=torch.float32); y = torch.tensor(y)
def run(cfg, model_fn, loss, target_fn, steps=150, bs=128):
    torch.manual_seed(0); m = model_fn()
    prog = lwcompile.transform(m, loss, X[:bs], cfg)
    g = torch.Generator().manual_seed(1); losses = []
    for s in range(steps):
        idx = torch.randint(0, len(X), (bs,), generator=g)
        losses.append(prog.step(X[idx], target_fn(idx)))
    with torch.no_grad():
        return float(loss(m(X), target_fn(torch.arange(len(X)))))
old = lwcompile.Config(steps=10, gamma=10.0, inner_lr=1e-5, momentum=0.999)
new = lwcompile.Config(steps=3, gamma=30.0, inner_lr=1e-4)
assert (new.steps, new.gamma, new.inner_lr) == (lwcompile.Config().steps, lwcompile.Config().gamma, lwcompile.Config().inner_lr)
cases = {
 "mlp-ce-tanh": (lambda: nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10)), F.cross_entropy, lambda i: y[i]),
 "mlp-ce-relu-bn": (lambda: nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)), F.cross_entropy, lambda i: y[i]),
 "ae-sigmoid": (lambda: nn.Sequential(nn.Linear(64, 32), nn.Sigmoid(), nn.Linear(32, 8), nn.Sigmoid(), nn.Linear(8, 32), nn.Sigmoid(), nn.Linear(32, 64)), F.mse_loss, lambda i: X[i]),
 "cnn-ce": (lambda: nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(512, 10)), F.cross_entropy, lambda i: y[i]),
}
for name, (mf, loss, tf) in cases.items():
    r = {}
    for k, c in (("old", old), ("new", new)):
        t = time.perf_counter(); v = run(c, mf, loss, tf); r[k] = (v, time.perf_counter() - t)
    torch.manual_seed(0); m = mf()
    with torch.no_grad(): init = float(loss(m(X), tf(torch.arange(len(X)))))
    print(f"{name:16s} init {init:.4f}  old {r['old'][0]:.4f} ({r['old'][1]:.1f}s)  new {r['new'][0]:.4f} ({r['new'][1]:.1f}s)", flush=True)
