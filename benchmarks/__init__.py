"""Benchmark suite of ttm_kernels (issue 4).

``python -m benchmarks --help`` for the sweep runner, ``pytest benchmarks/ --benchmark-only`` for the
pytest-benchmark suite. Both time the same providers (``benchmarks.providers``):

* ``fused``: ``ttm_kernels.fused_wttm_loss`` with ``backend="auto"``: the Triton kernels on CUDA, the C++
  kernel on CPU, or, where neither exists, the library's reference fallback (the ``backend`` column of
  every result says which one ran).
* ``eager``: ``ttm_kernels.reference.paper_wttm_loss``, the paper's code line for line.
* ``compile``: ``torch.compile`` of that same function.
* ``liger``: Liger-Kernel's ``LigerKLDIVLoss`` fed the log-softmax inputs it needs (only where
  ``liger_kernel`` imports, on CUDA).
* ``fused_inplace`` (opt-in): ``fused`` with ``inplace_backward=True``.

Modules: ``providers`` (losses, inputs, mode closures, memory estimates), ``measure`` (timers, peak
memory, copy bandwidth, environment), ``runner`` (sweeps, skips, CSV/JSON/table), ``report`` (plots),
``cli`` (arguments; ``__main__`` runs it).
"""
