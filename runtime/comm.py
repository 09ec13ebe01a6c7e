"""Point-to-point messages, step agreement and coalesced broadcasts over a torch.distributed group.

Every call waits at most ``timeout`` seconds; a peer that hangs, dies or reports a failure turns into a
:class:`DistributedError` that names the rank, the peer and the phase, instead of a hang.

* ``send(dst, values)`` / ``recv(src)``: a message is a list of values (tensors, or plain JSON values: None, bool,
  int, float, str, or pytrees of them), or a failure note in place of the values. Two transfers per message on the
  common path: a fixed-size header (status and metadata as JSON) and one flat buffer per dtype.

Nothing a peer sends is unpickled: metadata is JSON decoded by a strict reader (dtypes by name from a fixed
table, shapes as lists of ints), and the failure note after a failed step travels as UTF-8 bytes in a tensor.
A malformed message raises :class:`DistributedError`; it cannot run code on the receiver.
* ``agree(error, checksum, loss)``: one all-reduce per step; every rank learns whether any rank failed (and
  why), whether all ranks were given the same batch, and the loss of the rank that computed it.
* ``all_reduce(tensors, failed)``: sums over ranks (one transfer per dtype), with a "some rank failed" flag.
* ``broadcast(tensors, src)``: ``src``'s tensors copied into every rank's tensors of the same shapes.

Example (inside an initialised process group of two ranks)::

    comm = Comm(None, torch.device("cpu"), timeout=30.0)
    if comm.rank == 0:
        comm.send(1, [torch.ones(2), 3])
    else:
        values, failure = comm.recv(0)      # ([tensor([1., 1.]), 3], None)
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

from lwcompile.errors import DistributedError

HEADER_BYTES = 4096  # one transfer carries the status and the metadata of a typical message
NOTE_BYTES = 2048  # a failure note is cut to this many UTF-8 bytes
MAX_HEADER = 1 << 26  # a declared metadata length above this is a corrupt or hostile message
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex64, torch.complex128, torch.int64,
    torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)}
_PLAIN = (type(None), bool, int, float, str)


class RemoteFailure(str):
    """The failure note a rank sends in place of a message's values ("rank 1 (forward): ValueError: ...")."""


def _as_delta(seconds: float) -> timedelta:
    return timedelta(seconds=float(seconds))


class Comm:
    """Messages, agreement and broadcasts between the ranks of ``group`` (None: the default group)."""

    def __init__(self, group: dist.ProcessGroup | None, device: torch.device, timeout: float,
                 home: torch.device | None = None) -> None:
        self.home = torch.device(home) if home is not None else torch.device(device)  # where received tensors go
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.device = torch.device(device)
        self.timeout = float(timeout)
        self.phase = "setup"
        self.step = 0
        self.broken: str | None = None

    # ----------------------------------------------------------------------------------------------- errors
    def _where(self) -> str:
        return f"rank {self.rank}, step {self.step}, {self.phase}"

    @contextmanager
    def guard(self, waiting_on: str) -> Iterator[None]:
        """Turn a backend error (timeout, closed connection) into a DistributedError; the group is then unusable."""
        if self.broken:
            raise DistributedError(f"{self._where()}: the process group broke earlier ({self.broken}); "
                                   "start a new process group (or restart the job) to go on.")
        try:
            yield
        except DistributedError:
            raise
        except Exception as e:  # DistBackendError / RuntimeError from gloo or nccl
            text = str(e)
            if "imed out" in text or "timeout" in text.lower():
                why = (f"no answer from {waiting_on} within {self.timeout:g} s: a rank hung (or is much slower "
                       "than the timeout allows). Raise the timeout if the step is just slow.")
            elif "closed" in text.lower() or "reset" in text.lower() or "crash" in text.lower():
                why = f"lost the connection to {waiting_on}: a rank crashed or exited; check its log."
            else:
                why = f"communication with {waiting_on} failed"
            self.broken = why
            raise DistributedError(f"{self._where()}: {why} [{type(e).__name__}: {text.strip()[:300]}]") from e

    def _wait(self, work: Any) -> None:
        work.wait(_as_delta(self.timeout))

    # ---------------------------------------------------------------------------------------- point to point
    def send(self, dst: int, values: Sequence[Any] | None, failure: str | None = None) -> None:
        """Send ``values`` to ``dst``, or (``values`` None) the ``failure`` note in their place."""
        tensors: list[torch.Tensor] = []
        meta: list[Any] = []
        for v in values or ():
            leaves, spec = pytree.tree_flatten(v)
            leaf_meta = []
            for leaf in leaves:
                if isinstance(leaf, torch.Tensor):
                    if _dtype_name(leaf.dtype) not in _DTYPES:
                        raise DistributedError(f"{self._where()}: cannot send a tensor of dtype {leaf.dtype}.")
                    leaf_meta.append(["t", list(leaf.shape), _dtype_name(leaf.dtype), bool(leaf.requires_grad)])
                    tensors.append(leaf.detach())
                elif isinstance(leaf, _PLAIN):
                    leaf_meta.append(["o", leaf])
                else:  # only plain values travel: the receiver decodes JSON, never pickles
                    raise DistributedError(f"{self._where()}: cannot send a {type(leaf).__name__} to rank {dst}; "
                                           "messages carry tensors and plain values (None, bool, int, float, str).")
            meta.append([None if spec.is_leaf() else pytree.treespec_dumps(spec), leaf_meta])
        buffers = _pack(tensors, self.device)
        blob = json.dumps([failure, meta, [[_dtype_name(b.dtype), b.numel()] for b in buffers]]).encode()
        with self.guard(f"rank {dst} (sending to it)"):
            for t in [*_header(blob, self.device), *buffers]:
                self._wait(dist.isend(t, group=self.group, group_dst=dst))

    def recv(self, src: int) -> tuple[list[Any] | None, RemoteFailure | None]:
        """The values ``src`` sent, or its failure note. Tensors that carried gradients arrive as fresh leaves
        that require grad, so the receiver can send their gradients back."""
        with self.guard(f"rank {src} (waiting for its message)"):
            head = torch.empty(HEADER_BYTES, dtype=torch.uint8, device=self.device)
            self._wait(dist.irecv(head, group=self.group, group_src=src))
            head_bytes = head.cpu().numpy().tobytes()
            n = int.from_bytes(head_bytes[:8], "little")
            if n > MAX_HEADER:
                raise DistributedError(f"{self._where()}: rank {src} sent a malformed message header.")
            raw = head_bytes[8:8 + n]
            if n > HEADER_BYTES - 8:
                rest = torch.empty(n - (HEADER_BYTES - 8), dtype=torch.uint8, device=self.device)
                self._wait(dist.irecv(rest, group=self.group, group_src=src))
                raw += rest.cpu().numpy().tobytes()
            failure, meta, layout = _decode(raw, src, self._where())
            buffers = [torch.empty(numel, dtype=dtype, device=self.device) for dtype, numel in layout]
            for b in buffers:
                self._wait(dist.irecv(b, group=self.group, group_src=src))
        if failure is not None:
            return None, RemoteFailure(failure)
        metas = [m for _, leaf_meta in meta for m in leaf_meta if m[0] == "t"]
        tensors = iter(t.to(self.home) for t in _unpack(buffers, [(shape, dtype) for _, shape, dtype, _ in metas]))
        values = []
        for spec, leaf_meta in meta:
            leaves = []
            for m in leaf_meta:
                if m[0] == "t":
                    t = next(tensors)
                    leaves.append(t.requires_grad_(True) if m[3] and t.is_floating_point() else t)
                else:
                    leaves.append(m[1])
            values.append(leaves[0] if spec is None else pytree.tree_unflatten(leaves, pytree.treespec_loads(spec)))
        return values, None

    # ----------------------------------------------------------------------------------------------- collectives
    def agree(self, error: BaseException | str | None, checksum: float = 0.0, loss: float | None = None) -> float:
        """End-of-phase agreement: every rank calls it once per step. Returns the loss sent by the rank that has one.

        Raises (on every rank) when a rank failed: the failing rank re-raises its own exception, the others a
        DistributedError naming it; also raises when the ranks were given different batches.
        """
        w = self.world
        vec = torch.full((w + 4,), -math.inf, dtype=torch.float64)
        vec[:w] = 0.0
        vec[self.rank] = 1.0 if error is not None else 0.0
        vec[w], vec[w + 1], vec[w + 3] = checksum, -checksum, 0.0
        if loss is not None:  # only the rank that computed the loss sends it; NaN travels as a flag
            vec[w + 2], vec[w + 3] = (-math.inf, 1.0) if math.isnan(loss) else (loss, 0.0)
        vec = vec.to(self.device)
        with self.guard("the other ranks (step agreement)"):
            self._wait(dist.all_reduce(vec, op=dist.ReduceOp.MAX, group=self.group, async_op=True))
        vec = vec.cpu()
        failed = [r for r in range(w) if vec[r] > 0]
        if failed:
            buf = torch.zeros(NOTE_BYTES, dtype=torch.uint8)
            if self.rank == failed[0]:  # UTF-8 bytes in a tensor: nothing to unpickle on the other ranks
                data = _describe(error).encode("utf-8", "replace")[:NOTE_BYTES]
                buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            buf = buf.to(self.device)
            with self.guard(f"rank {failed[0]} (its failure note)"):
                self._wait(dist.broadcast(buf, group=self.group, group_src=failed[0], async_op=True))
            note = [bytes(buf.cpu().numpy().tobytes()).rstrip(b"\0").decode("utf-8", "replace")]
            if isinstance(error, BaseException):
                raise error
            others = f" (ranks {failed} failed)" if len(failed) > 1 else ""
            raise DistributedError(f"{self._where()}: rank {failed[0]} failed{others}, so this rank stops too: "
                                   f"{note[0]}. The model is left as it was before this step.")
        hi, lo = float(vec[w]), -float(vec[w + 1])
        if abs(hi - lo) > 1e-6 * max(abs(hi), abs(lo)) + 1e-9:
            raise DistributedError(f"{self._where()}: the ranks were given different batches (checksums "
                                   f"{lo:.6g} .. {hi:.6g}); every rank must call step(x, y) with the same data.")
        return math.nan if vec[w + 3] > 0 else float(vec[w + 2])

    def broadcast(self, tensors: Sequence[torch.Tensor], src: int) -> None:
        """Copy ``src``'s ``tensors`` into every rank's (same shapes and dtypes everywhere), in place."""
        if not tensors:
            return
        buffers = _pack(list(tensors), self.device)
        with self.guard(f"rank {src} (broadcast of its results)"):
            for b in buffers:
                self._wait(dist.broadcast(b, group=self.group, group_src=src, async_op=True))
        if self.rank != src:
            with torch.no_grad():
                for t, new in zip(tensors, _unpack(buffers, [(t.shape, t.dtype) for t in tensors])):
                    t.copy_(new)

    def all_reduce(self, tensors: Sequence[torch.Tensor], failed: bool = False) -> tuple[list[torch.Tensor], bool]:
        """The sums over ranks of ``tensors`` (new tensors, same shapes) and whether any rank passed ``failed``.

        One all-reduce per dtype (the flag rides in the float64 buffer). A rank that failed locally still calls
        this (with zeros) so the others learn it at once instead of waiting for the timeout; the caller then
        calls :meth:`agree` to raise everywhere with the failing rank's note."""
        flag = torch.tensor([1.0 if failed else 0.0], dtype=torch.float64)
        items = [*tensors, flag]
        buffers = _pack(items, self.device)  # a dtype's only tensor may come back as itself: never reduce in place
        buffers = [b.clone() if any(b.data_ptr() == t.data_ptr() for t in items) else b for b in buffers]
        with self.guard("the other ranks (all-reduce)"):
            for b in buffers:
                self._wait(dist.all_reduce(b, op=dist.ReduceOp.SUM, group=self.group, async_op=True))
        out = [t.to(self.home) for t in _unpack(buffers, [(t.shape, t.dtype) for t in items])]
        return out[:-1], bool(out[-1].item() > 0)

    def check_same(self, what: str, value: float) -> None:
        """Raise on every rank unless all ranks pass the same ``value`` (e.g. a hash of the plan)."""
        vec = torch.tensor([value, -value], dtype=torch.float64, device=self.device)
        with self.guard("the other ranks (setup check)"):
            self._wait(dist.all_reduce(vec, op=dist.ReduceOp.MAX, group=self.group, async_op=True))
        if float(vec[0]) != -float(vec[1]):
            raise DistributedError(f"{self._where()}: the ranks disagree on {what}; build the same program and "
                                   "plan on every rank (same model, config and devices).")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _decode(raw: bytes, src: int, where: str) -> tuple[str | None, list, list[tuple[torch.dtype, int]]]:
    """Parse and validate a message header (JSON); anything unexpected is a DistributedError, never executed."""
    def bad(why: str) -> DistributedError:
        return DistributedError(f"{where}: rank {src} sent a malformed message ({why}).")

    try:
        failure, meta, layout = json.loads(raw.decode("utf-8"))
    except (ValueError, TypeError, UnicodeDecodeError) as e:
        raise bad(f"header is not the expected JSON: {type(e).__name__}") from None
    if failure is not None and not isinstance(failure, str):
        raise bad("failure note is not a string")
    dtypes = []
    for entry in layout if isinstance(layout, list) else [None]:
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0] in _DTYPES and type(entry[1]) is int
                and entry[1] >= 0):
            raise bad("buffer layout")
        dtypes.append((_DTYPES[entry[0]], entry[1]))
    for item in meta if isinstance(meta, list) else [None]:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[1], list)
                and (item[0] is None or isinstance(item[0], str))):
            raise bad("value metadata")
        for i, m in enumerate(item[1]):
            if (isinstance(m, list) and len(m) == 4 and m[0] == "t" and isinstance(m[1], list)
                    and all(type(d) is int and d >= 0 for d in m[1]) and m[2] in _DTYPES and isinstance(m[3], bool)):
                item[1][i] = ("t", tuple(m[1]), _DTYPES[m[2]], m[3])
            elif isinstance(m, list) and len(m) == 2 and m[0] == "o" and isinstance(m[1], _PLAIN):
                item[1][i] = ("o", m[1])
            else:
                raise bad("leaf metadata")
    return failure, meta, dtypes


def _describe(error: BaseException | str | None) -> str:
    if isinstance(error, BaseException):
        return f"{type(error).__name__}: {error}"
    return str(error)


def _header(blob: bytes, device: torch.device) -> list[torch.Tensor]:
    data = len(blob).to_bytes(8, "little") + blob
    head = torch.zeros(HEADER_BYTES, dtype=torch.uint8)
    first = data[:HEADER_BYTES]
    head[: len(first)] = torch.frombuffer(bytearray(first), dtype=torch.uint8)
    out = [head.to(device)]
    if len(data) > HEADER_BYTES:
        out.append(torch.frombuffer(bytearray(data[HEADER_BYTES:]), dtype=torch.uint8).to(device))
    return out


def _pack(tensors: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """One flat buffer per dtype, in order of first appearance."""
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t.detach().reshape(-1))
    return [torch.cat(g).to(device) if len(g) > 1 else g[0].contiguous().to(device) for g in groups.values()]


def _unpack(buffers: Sequence[torch.Tensor], shapes: Sequence[tuple]) -> list[torch.Tensor]:
    """The inverse of :func:`_pack` for tensors of these (shape, dtype)s."""
    by_dtype = {b.dtype: b for b in buffers}
    offsets = {d: 0 for d in by_dtype}
    out = []
    for shape, dtype in shapes:
        n = math.prod(shape)
        buf = by_dtype[dtype]
        out.append(buf[offsets[dtype]:offsets[dtype] + n].view(shape).clone())
        offsets[dtype] += n
    return out
