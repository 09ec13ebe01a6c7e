"""A placement plan: which device runs which blocks' inner loops, and what that is predicted to cost.

A :class:`Plan` is a frozen record made by :func:`lwcompile.runtime.placement.make_plan`. It prints as a table and
turns into JSON, DOT text or a PNG picture; :meth:`Plan.from_json` reads the JSON back.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from lwcompile.errors import ConfigError


@dataclass(frozen=True, eq=False)
class Plan:
    """Where each block's inner loop runs.

    mode:        "replicated" or "partitioned".
    devices:     device names, in order.
    assignment:  device -> block names in run order (a device may get none).
    times:       device -> predicted inner-phase seconds (sum of its blocks' costs).
    memory:      device -> bytes for its blocks (parameters, optimizer state, one batch of activations).
    makespan:    the slowest device's time: the predicted inner phase of one training step.
    lower_bound: max(largest block, total / devices); no placement can beat it.
    graph:       the placement graph (nodes: cost, memory, flops, measured; edges: bytes).
    algorithm:   how the assignment was found ("optimal", "lpt+search", "contiguous-dp", ...).

    Example:
        >>> g = nx.DiGraph(); g.add_node("fc", cost=0.5, memory=1024, flops=10, measured=True)
        >>> p = Plan("replicated", ("cpu",), {"cpu": ("fc",)}, {"cpu": 0.5}, {"cpu": 1024}, 0.5, 0.5, g)
        >>> p.device_of("fc"), Plan.from_json(p.to_json()) == p
        ('cpu', True)
    """

    mode: str
    devices: tuple[str, ...]
    assignment: Mapping[str, tuple[str, ...]]
    times: Mapping[str, float]
    memory: Mapping[str, int]
    makespan: float
    lower_bound: float
    graph: nx.DiGraph = field(repr=False)
    algorithm: str = ""

    # -------------------------------------------------------------------------------------------------- queries
    def device_of(self, block: str) -> str:
        """The device that runs `block`'s inner loop."""
        for device, blocks in self.assignment.items():
            if block in blocks:
                return device
        raise ConfigError(f"block {block!r} is not in this plan; its blocks are {list(self.graph)[:8]}.")

    @property
    def crossing_bytes(self) -> int:
        """Activation bytes on edges whose producer and consumer run on different devices."""
        where = {b: d for d, bs in self.assignment.items() for b in bs}
        return sum(nb for u, v, nb in self.graph.edges(data="bytes") if where.get(u) != where.get(v))

    # ---------------------------------------------------------------------------------------------- conversions
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict holding everything, the graph included."""
        return {
            "mode": self.mode,
            "devices": list(self.devices),
            "assignment": {d: list(bs) for d, bs in self.assignment.items()},
            "times": dict(self.times),
            "memory": dict(self.memory),
            "makespan": self.makespan,
            "lower_bound": self.lower_bound,
            "algorithm": self.algorithm,
            "graph": {
                "attrs": dict(self.graph.graph),
                "nodes": [{"name": n, **d} for n, d in self.graph.nodes(data=True)],
                "edges": [{"source": u, "target": v, **d} for u, v, d in self.graph.edges(data=True)],
            },
        }

    def to_json(self, indent: int | None = 2) -> str:
        """The plan as JSON text; :meth:`from_json` reads it back into an equal plan."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        """The inverse of :meth:`to_dict`."""
        g = nx.DiGraph(**data["graph"]["attrs"])
        for node in data["graph"]["nodes"]:
            node = dict(node)
            g.add_node(node.pop("name"), **node)
        for edge in data["graph"]["edges"]:
            edge = dict(edge)
            g.add_edge(edge.pop("source"), edge.pop("target"), **edge)
        return cls(
            mode=data["mode"],
            devices=tuple(data["devices"]),
            assignment={d: tuple(bs) for d, bs in data["assignment"].items()},
            times=dict(data["times"]),
            memory=dict(data["memory"]),
            makespan=data["makespan"],
            lower_bound=data["lower_bound"],
            graph=g,
            algorithm=data.get("algorithm", ""),
        )

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """The inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))

    def __eq__(self, other: object) -> bool:
        # Compared through to_dict() because graphs and dicts have no useful identity-free equality of their own.
        return isinstance(other, Plan) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash((self.mode, self.devices, self.makespan, self.lower_bound))

    # -------------------------------------------------------------------------------------------------- display
    def __str__(self) -> str:
        steps = self.graph.graph.get("steps")
        head = (f"{self.mode} plan: {self.graph.number_of_nodes()} blocks on {len(self.devices)} devices"
                + (f", {steps} inner steps" if steps else "") + (f" ({self.algorithm})" if self.algorithm else ""))
        # The blocks cell wraps onto continuation lines, between names only: a block name is never cut, however
        # long (a truncated "encoder.layers.11.self_attn…" cannot be told from its siblings).
        rows = [("device", ["blocks"], "inner time", "memory", "share")]
        for d in self.devices:
            share = self.times[d] / self.makespan if self.makespan > 0 else 0.0
            rows.append((d, _wrap(self.assignment[d]), _seconds(self.times[d]), _bytes(self.memory[d]),
                         f"{100 * share:.1f}%"))
        widths = [max(len(r[i]) if i != 1 else max(map(len, r[1])) for r in rows) for i in range(len(rows[0]))]
        lines = [head]
        for device, blocks, *rest in rows:
            for k, part in enumerate(blocks):
                cells = (device, part, *rest) if k == 0 else ("", part, *("" for _ in rest))
                lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())
        if self.graph.number_of_edges():
            lines.append(f"activations crossing devices: {_bytes(self.crossing_bytes)}")
        lines.append(f"makespan {_seconds(self.makespan)} vs lower bound {_seconds(self.lower_bound)}")
        return "\n".join(lines)

    def to_dot(self) -> str:
        """Graphviz DOT text: one cluster per device, nodes labelled with their time, edges with their bytes
        (red where they cross devices). Render with `dot -Tpng plan.dot -o plan.png`."""
        lines = ["digraph plan {", "  rankdir=LR;", "  node [shape=box];"]
        for i, d in enumerate(self.devices):
            lines.append(f"  subgraph cluster_{i} {{")
            lines.append(f"    label={_q(f'{d}: {_seconds(self.times[d])}')};")
            for b in self.assignment[d]:
                label = b + "\n" + _seconds(self.graph.nodes[b]["cost"])
                lines.append(f"    {_q(b)} [label={_q(label)}];")
            lines.append("  }")
        where = {b: d for d, bs in self.assignment.items() for b in bs}
        for u, v, nb in self.graph.edges(data="bytes"):
            style = ", color=red" if where.get(u) != where.get(v) else ""
            lines.append(f"  {_q(u)} -> {_q(v)} [label={_q(_bytes(nb))}{style}];")
        lines.append("}")
        return "\n".join(lines) + "\n"

    def figure(self):
        """The picture :meth:`draw` writes, as a matplotlib ``Figure`` (Agg canvas, no pyplot): one column per
        device headed by its name and predicted time, each block a box (name, inner-loop time) in run order, and
        the activation edges between blocks: gray within a device and, in partitioned mode, red and labelled with
        their bytes across devices (replicas each run the whole forward, so none travels). The figure is sized so
        that every label lies inside it, however many blocks and however long their names."""
        import textwrap

        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        pos = {b: (i, -k) for i, d in enumerate(self.devices) for k, b in enumerate(self.assignment[d])}
        depth = max((len(bs) for bs in self.assignment.values()), default=1) or 1
        chars = max((len(b) for b in pos), default=8)
        column = max(1.6, 0.075 * chars + 0.5)  # inches: the widest box at 8 pt, plus a gap
        width, height = max(5.0, column * len(self.devices) + 0.6), 0.5 * depth + 1.8
        fig = Figure(figsize=(width, height))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.set_axis_off()
        ax.set_xlim(-0.5, len(self.devices) - 0.5)
        ax.set_ylim(-depth + 0.5, 1.3)
        boxes = {}
        for b, (x, y) in pos.items():
            color = f"C{x % 10}"
            boxes[b] = ax.text(x, y, f"{b}\n{_seconds(self.graph.nodes[b].get('cost', 0.0))}", ha="center",
                               va="center", fontsize=8, zorder=3, bbox={"boxstyle": "round,pad=0.3", "fc": "white",
                                                              "ec": color, "lw": 1.5})
        for i, d in enumerate(self.devices):
            ax.text(i, 0.9, f"{d}\n{_seconds(self.times[d])}", ha="center", va="center", fontsize=9,
                    fontweight="bold")
        where = {b: d for d, bs in self.assignment.items() for b in bs}
        for u, v, nb in self.graph.edges(data="bytes"):
            if u not in pos or v not in pos:
                continue
            cross = where[u] != where[v]
            if cross and self.mode != "partitioned":
                continue  # replicas each run the whole forward: no activation travels between them
            adjacent = pos[u][0] == pos[v][0] and abs(pos[u][1] - pos[v][1]) == 1
            ax.annotate("", xy=pos[v], xytext=pos[u], zorder=1, arrowprops={
                "arrowstyle": "-|>", "color": "tab:red" if cross else "0.55", "lw": 1.2 if cross else 0.8,
                "patchA": boxes[u].get_bbox_patch(), "patchB": boxes[v].get_bbox_patch(),
                "connectionstyle": "arc3,rad=0.0" if adjacent or cross else "arc3,rad=0.25"})
            if cross:
                ax.text((pos[u][0] + pos[v][0]) / 2, (pos[u][1] + pos[v][1]) / 2, _bytes(nb or 0), fontsize=7,
                        color="tab:red", ha="center", va="center", zorder=2,
                        bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8})
        title = (f"{self.mode} plan: {len(pos)} blocks on {len(self.devices)} devices; makespan "
                 f"{_seconds(self.makespan)} vs lower bound {_seconds(self.lower_bound)}; activations crossing "
                 f"devices {_bytes(self.crossing_bytes)}")
        ax.set_title("\n".join(textwrap.wrap(title, max(30, int(width * 72 / (10 * 0.6))))), fontsize=10)
        _fit(fig)
        return fig

    def draw(self, path: str) -> str:
        """Write :meth:`figure` as a PNG to ``path`` (never touches pyplot's global state or needs a display);
        returns ``path``."""
        self.figure().savefig(path, format="png", dpi=100)
        return path


def _fit(fig) -> None:
    """Lay the figure out and grow it until every artist (titles, labels, boxes) lies inside it."""
    renderer = fig.canvas.get_renderer()
    for _ in range(4):
        fig.tight_layout(pad=0.6)
        tight, whole = fig.get_tightbbox(renderer), fig.bbox_inches
        if tight.x0 >= 0 and tight.y0 >= 0 and tight.x1 <= whole.x1 and tight.y1 <= whole.y1:
            return
        fig.set_size_inches(max(whole.width, tight.width + 0.5), max(whole.height, tight.height + 0.5))


def _seconds(s: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if abs(s) >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns" if s else "0 s"


def _bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _wrap(names: Sequence[str], width: int = 48) -> list[str]:
    """``names`` joined by ", " into lines of at most ``width`` characters where possible, breaking only between
    names (a longer name gets a line of its own, whole). Every line but the last ends with a comma."""
    lines: list[str] = []
    line = ""
    for n in names:
        if line and len(line) + 2 + len(n) > width:
            lines.append(line + ",")
            line = n
        else:
            line = f"{line}, {n}" if line else n
    return lines + [line or "-"]


def _q(text: str) -> str:
    """A DOT double-quoted string (block names may contain dots, brackets or quotes)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
