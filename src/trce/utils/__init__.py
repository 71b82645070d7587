"""Small shared utilities (atomic I/O, records, processes)."""

from __future__ import annotations


def callable_module(name: str, function) -> None:
    """Make the module `name` callable: `module(...)` is `function(...)`.

    The top-level API names some calls after subpackages (`trce.methods()` lists the methods,
    `trce.report(runs, out)` writes a report, `trce.concepts()` lists the concepts): the package stays a
    package (`from trce.methods import erase` works as before) and calling it does the obvious thing.
    """
    import sys
    import types

    class _CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return function(*args, **kwargs)

    _CallableModule.__call__.__doc__ = function.__doc__
    sys.modules[name].__class__ = _CallableModule
