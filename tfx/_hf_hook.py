"""Registration of the exported TokenFLEX classes with transformers' Auto classes, from a plain
`import tfx`, without importing transformers (and torch) when a process never uses them.

If transformers is already imported, `tfx.model` (which registers) is imported at once. Else a
finder on `sys.meta_path` waits for the first `import transformers`, lets it run unchanged, and
imports `tfx.model` right after; then it removes itself. Nothing of transformers is modified.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys


class _ThenRegister(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        self.inner.exec_module(module)
        import tfx.model  # noqa: F401  (registers the Auto classes)

    def __getattr__(self, name):  # get_source, is_package, resource readers: the real loader's
        return getattr(self.inner, name)


class _WhenTransformersLoads(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenRegister(spec.loader)
        return spec


def install() -> None:
    if "transformers" in sys.modules:
        import tfx.model  # noqa: F401
    elif not any(isinstance(f, _WhenTransformersLoads) for f in sys.meta_path):
        sys.meta_path.insert(0, _WhenTransformersLoads())
