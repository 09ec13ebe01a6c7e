"""The reference experiment's data and models; not part of the compiler.

`lwcompile.experiments.data` loads MNIST (idx files) or scikit-learn's 8x8 digits and batches them;
`lwcompile.experiments.models` builds the paper's deep autoencoder, a small MLP and CNN, the task losses,
the backprop baselines' optimizers and the reference learning-rate schedule. The examples, benchmarks and
tests use them; `lwcompile` itself never imports this subpackage.
"""
