"""What the processes of runnable pods load at start (``sitecustomize``, on their PYTHONPATH only): the
emulated ServiceAccount mount and cluster DNS. See docs/DESIGN.md "What the simulator does not imitate"."""
