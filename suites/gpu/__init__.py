"""The GPU run: one command for the first GPU lent to the project, prepared to the minute.

    python3 -m suites.gpu --out "$OUT" --commit SHA   # on the GPU machine: <= 8 min on one H100
    python -m suites.gpu --dry-run                    # here: the same code on CPU, tiny sizes

It needs only PyTorch (and torchvision for ResNet-34; pytest and hypothesis for the tests step),
all preinstalled on the lent machines; README.md, "For whoever gets a GPU first", has the exact
call of the device tool.

Rules (GPU run):

GR1. Steps run in order, each in a fresh process killed at its own time budget (``points.STEPS``):
     tests, equality, figs23, resnet34, table2. A step gets the lesser of its budget and what is
     left of the run's (``--budget-s``, 450 s: with the kill grace and the start, 8 minutes).
GR2. Rows go to ``<out>/gpu_run.jsonl`` as each point finishes (``suites/rows.py``), so a run cut
     off keeps every finished point. A rerun skips the points whose last row, in ``<out>`` or in
     ``--resume`` (default ``reports/benchmark/cuda/gpu_run.jsonl``), is final (ok, oom).
GR3. Every row carries the environment record (``suites/environment.py``) and the device's:
     GPU name and memory, driver, CUDA and cuDNN versions, TF32 off, and ``--commit`` (the
     lent machine gets the working tree without ``.git``).
GR4. A series (one step, network, kind, dtype, tile) grows in size. After a point runs out of
     memory the larger ones are ``skipped`` rows saying so; a point whose time, extrapolated from
     the previous one by its pixels, would pass the step's deadline is skipped likewise.
GR5. ``--dry-run`` runs every step through the same code on CPU at tiny sizes (the tests step runs
     the GPU tests, which skip without CUDA: they must collect). Its rows go to a temporary
     folder unless ``--out`` says otherwise, never to reports/. ``nox -s gpu`` runs it in CI.
GR6. Measured: float32 means float32 (TF32 off), bf16 is autocast with float32 parameters; time
     by CUDA events after a warm-up (the wall clock on CPU), 1-3 timed steps; memory as the CUDA
     allocator's peak over the baseline, beside the plan's estimate for streamed points; gradient
     error against conventional training of the same point where that ran in the same step.
"""
