"""A run end to end in one process: the method registry, the runner, the results contract
(``results``), membership inference on what each adversary saw (``leakage``), the epsilon sweep
and the plots.

May import: ``fedsecmem.baselines``, ``fedsecmem.method`` and everything they may import; not
``fedsecmem.deployment`` or the CLI.
"""

import sys as _sys
from importlib import import_module as _import_module
from types import ModuleType as _ModuleType


class _CallableRun(_ModuleType):
    """``fedsecmem.run(config, out=..., overrides=...)`` runs a config (``fedsecmem.api.run``, the public
    API at the top of the layers); the package stays importable as ``fedsecmem.run.<module>``."""

    def __call__(self, config, out=None, overrides=None):
        return _import_module("fedsecmem.api").run(config, out=out, overrides=overrides)


_sys.modules[__name__].__class__ = _CallableRun
