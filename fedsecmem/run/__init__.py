"""A run end to end in one process: the method registry, the runner, the results contract
(``results``), membership inference on what each adversary saw (``leakage``), the epsilon sweep
and the plots.

May import: ``fedsecmem.baselines``, ``fedsecmem.method`` and everything they may import; not
``fedsecmem.deployment`` or the CLI.
"""
