"""The GPU's shares on a terminal (``coder-stack status`` in time-sliced mode): one table, a row per model pod on
a GPU node and a row of what is left on each node. The library's :class:`~coder_stack.usecases.shares.GpuShares`
knows no terminal; exclusive mode has no shares and prints nothing here.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from coder_stack.usecases.shares import GpuShares, NodeShares, PodShare


def advertised(n: NodeShares) -> str:
    """What the node advertises: its nvidia.com/gpu, the replicas and one GPU's memory (and where that came from)."""
    g = n.node
    sliced = f"time-sliced, {n.replicas} replicas per GPU" if g.time_sliced else "not time-sliced"
    return f"nvidia.com/gpu={g.gpus}, {sliced}, {n.gpu_memory_gb:g} GB per GPU ({n.gpu_memory_source})"


def share_cell(p: PodShare, memory_gb: float) -> str:
    held = "held" if p.holds else "not held: its container does not run"
    return f"{p.utilization:g} x {memory_gb:g} GB = {p.share_gb:g} GB ({held})"


def left_cell(n: NodeShares) -> str:
    return (
        f"{n.left_gb:g} GB of {n.gpu_memory_gb:g} GB free ({n.used_gb:g} GB held); "
        f"{max(n.replicas_left, 0)} of {n.replicas} replicas free"
    )


def render(shares: GpuShares) -> Table:
    """Every cell is plain Text (pod and node names are not markup)."""
    t = Table(title="GPU shares (time-sliced)")
    for col in ("node", "advertises", "model", "share", "pod"):
        t.add_column(col)
    for n in shares.nodes:
        first = True
        for p in n.pods:
            t.add_row(
                Text(n.node.name if first else ""),
                Text(advertised(n) if first else ""),
                Text(p.model),
                Text(share_cell(p, n.gpu_memory_gb)),
                Text(f"{p.pod} {p.status}"),
            )
            first = False
        t.add_row(Text(n.node.name if first else ""), Text(advertised(n) if first else ""), Text("left"),
                  Text(left_cell(n)), Text(""))  # fmt: skip
    for p in shares.unplaced:
        t.add_row(Text("-"), Text(""), Text(p.model), Text(f"{p.utilization:g} of a GPU once placed"),
                  Text(f"{p.pod} {p.status}"))  # fmt: skip
    return t


def show(out: Console, shares: GpuShares) -> None:
    """The table (when there is a GPU node or a model pod to show), then the notes."""
    if shares.nodes or shares.unplaced:
        out.print(render(shares))
    for note in shares.notes:
        out.print(Text(f"GPU shares: {note}"))
