"""The experiments beside the library: the demo, the benchmarks, the paper's figures, the wrap demo, their
training loop, embedded tasks and plots, and the ``adaptive-depth`` command that runs them.

They use the library's public API only; the library never imports them (plots aside: ``Diagnostics.plot``
calls ``experiments.plots`` lazily). Their extra dependencies (matplotlib, tqdm, mnist1d) come with the
``experiments`` extra (and ``dev``).
"""
