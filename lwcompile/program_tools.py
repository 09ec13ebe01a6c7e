"""The Program's front door to placement, export, profiling and printing: each method hands the compiled program
to the module that does the work (:mod:`lwcompile.runtime.placement`, :mod:`lwcompile.export`,
:mod:`lwcompile.profiling`, :mod:`lwcompile.printing`), which reads only the Program's public surface.

Example:
    >>> import torch, lwcompile
    >>> prog = lwcompile.transform(torch.nn.Sequential(torch.nn.Linear(3, 2)), torch.nn.functional.mse_loss,
    ...                            torch.randn(4, 3))
    >>> isinstance(prog, ProgramTools), "Sequential" in str(prog)
    (True, True)
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from lwcompile.passes.optimizers import make_optimizer


class ProgramTools:
    """Mixed into :class:`lwcompile.Program`: planning, export, profiling and printing."""

    def profile(self, x: Any, y: Any, repeats: int = 3) -> dict[str, float]:
        """Measured seconds of each block's inner loop on this batch (median of ``repeats``); pass the result
        to :meth:`plan` as ``profile=`` to replace the FLOP estimate. Nothing in the model changes."""
        from lwcompile.profiling import profile_blocks

        return profile_blocks(self, x, y, repeats)

    # ------------------------------------------------------------------ placement and export
    def plan(self, devices: Sequence[str] | int = 1, mode: str = "replicated", profile: Mapping[str, float] | None = None,
             device_rate: float | None = None):
        """Place the blocks' inner loops on devices and predict what one training step's inner phase costs.

        Args:
            devices: a count of simulated identical devices (``2`` -> "sim:0", "sim:1") or device names
                (``["cuda:0", "cuda:1"]``, ``["cpu"]``); a CUDA device this machine lacks is refused
                (:class:`~lwcompile.ConfigError`).
            mode: "replicated" (every device runs the whole forward and some blocks' inner loops; the
                assignment balances predicted time) or "partitioned" (each device holds a contiguous run of blocks,
                a pipeline stage, and activations cross between stages).
            profile: measured seconds per block name (:meth:`profile`), replacing the FLOP estimate for the
                blocks it names.
            device_rate: FLOP/s of one device, to turn FLOPs into seconds; None measures a CPU matmul once per
                process.

        Returns:
            a :class:`lwcompile.runtime.plan.Plan`: ``assignment`` (device -> block names, what
            ``step(..., assignment=...)`` takes), predicted ``times``, ``memory`` and ``makespan`` per device, the
            ``lower_bound`` no placement can beat, and ``to_json()``, ``to_dot()``, ``draw(path)`` to show it.

        Example:
            >>> import torch, lwcompile
            >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
            >>> prog = lwcompile.transform(model, torch.nn.functional.mse_loss, torch.randn(16, 4))
            >>> plan = prog.plan(devices=2, device_rate=1e9)
            >>> sorted(b for blocks in plan.assignment.values() for b in blocks), plan.devices
            (['0', '2'], ('sim:0', 'sim:1'))
        """
        from lwcompile.runtime.placement import make_plan

        slots = make_optimizer(self.config.inner_optimizer, self.config.optimizer_options()).slots
        return make_plan(self.blocks, self.partition.edges, self.config.steps, devices, mode,
                         profile=profile, device_rate=device_rate, optimizer_slots=slots,
                         exact=self.config.inner_optimizer == "exact")

    def export_onnx(self, out_dir: str, **kwargs: Any):
        """Write every graph to ONNX files in ``out_dir``, with the current weights, optimizer states and a manifest.

        Args:
            out_dir: a missing or empty directory (or, with ``overwrite=True``, a previous export holding nothing
                else); anything else is refused (:class:`~lwcompile.ExportError`) before anything is written.
            **kwargs: passed to :func:`lwcompile.export.export_program`: ``example_labels`` (labels to build the
                target graph for; default: those given to ``transform``, the last step's, or inferred from a
                standard loss: MSE/L1/SmoothL1/Huber/BCE give output-shaped floats, CrossEntropy/NLL class
                indices), ``training`` (default True: also write the onnxruntime-training artifacts of each
                block), ``optimizer`` (the artifacts' optimizer: "auto" (default) reproduces gd and adam exactly,
                or "sgd", "adam", "adamw"), ``devices`` (a plan or a block -> device mapping recorded per block),
                ``opset`` (default 18) and ``overwrite`` (default False).

        Returns:
            the manifest (also written as ``out_dir/manifest.json``): the files of the target graph and of each
            block's inner-update graph, their input and output names, and the program's configuration. Every graph
            has a dynamic batch dimension (``lwcompile.runtime.ort.OrtProgram`` trains from the files at any batch
            size). Tied weights and (with ``training=True``) frozen
            block parameters are refused with an :class:`~lwcompile.ExportError`.

        Example:
            >>> import torch, lwcompile
            >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
            >>> prog = lwcompile.transform(m, torch.nn.functional.mse_loss, torch.randn(16, 4), steps=2)
            >>> manifest = prog.export_onnx("onnx_out")  # labels inferred from mse_loss  # doctest: +SKIP
            >>> sorted(manifest)  # doctest: +SKIP
            [...]
        """
        from lwcompile.export import export_program, refuse_unexportable

        refuse_unexportable(self, training=kwargs.get("training", True))
        return export_program(self, out_dir, **kwargs)

    def __str__(self) -> str:
        from lwcompile.printing import describe

        return describe(self)

    __repr__ = __str__
