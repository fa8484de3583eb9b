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

Modules: ``providers`` (losses, inputs, mode closures, bytes model, memory estimates), ``measure``
(timers, peak memory, copy bandwidth, environment), ``runner`` (sweeps, skips, CSV/JSON/table), ``report``
(plots; ``python -m benchmarks.report run.json`` redraws them), ``cli`` (arguments; ``__main__`` runs it),
``summary`` (``python -m benchmarks.summary run.csv``: a compact table for logs), ``results_md``
(``python -m benchmarks.results_md run.json``: the run's table into RESULTS.md), ``test_bench_wttm``
(pytest-benchmark). ``gpu_check.sh`` is the GPU machine's one-shot check; NOTES.md the GPU study plan.
Other engineers' scripts live here too (``cpu_bench``, ``linear_bench``, ``topk_bench``, ``tp_bench``,
``trl_bench``: TRL's, Liger's and our distillation losses side by side, ``tune_triton``).
"""
