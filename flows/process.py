"""What a process that runs coder-stack flows sets up once, before its flows run: every flow's guard calls it
(a worker-run flow never passes through the CLI), and the CLI and the benchmark call it first, before a flow.

The garbage collector: a full collection of a process's start-up heap (Prefect, its clients, the flows'
modules: ~280,000 objects) takes 0.2-0.4 s on a 2-core machine, and one fell between a GPU's release and the
next model's scale-up in half the benchmark's hand-offs (BENCHMARKS.md, "Where the in-session time went").
Collected once and frozen (``gc.freeze``), that heap is out of the collector's view, so later full collections
walk only what was made since. It belongs to whoever owns the process, not to the library.
"""

from __future__ import annotations

import gc

_FROZEN = False


def freeze_startup_heap() -> None:
    """Once per process: collect, then move every object alive now out of the garbage collector's view.

    Objects alive at start-up (modules, classes, functions, settings) live as long as the process, so nothing
    collectable is hidden from the collector for long; call it after the imports, before the flows run."""
    global _FROZEN
    if not _FROZEN:
        _FROZEN = True
        gc.collect()
        gc.freeze()
