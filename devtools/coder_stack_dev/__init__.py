"""coder-stack's development tools: the demo, the benchmark and their commands (not part of the product)."""

from __future__ import annotations

from pathlib import Path


def find_checkout(here: Path = Path(__file__)) -> Path:
    """The coder-stack checkout the dev tools run from (they are installed from it in place, ``./dev.sh``):
    the folder above ``devtools/`` that holds ``prefect.yaml``."""
    root = here.resolve().parents[2]
    if not (root / "prefect.yaml").is_file():
        raise RuntimeError(
            f"coder_stack_dev is not running from a checkout of coder-stack: {root} has no prefect.yaml; the "
            "development tools work only in place in the repository (git clone ..., then ./dev.sh, which installs "
            "them with pip install -e ./devtools)"
        )
    return root


CHECKOUT = find_checkout()
"""The checkout's root: prefect.yaml, the flows' sources, devtools/ (found once, at import)."""
