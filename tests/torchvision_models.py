"""torchvision's own model code for the parity tests, importable without torchvision's compiled ops.

The torchvision wheel on PyPI is built against the CUDA build of torch; with the CPU build of torch
(torch==2.13.0+cpu here) its C extension does not load and `import torchvision` fails in
`_meta_registrations` ("operator torchvision::nms does not exist"). The models are plain Python: when
the normal import fails, the package is entered without running its `__init__`, so that
`torchvision.models.inception` is the real torchvision source.
"""
import importlib
import importlib.machinery
import importlib.util
import pathlib
import sys
import types


def inception_module():
  """The `torchvision.models.inception` module (skips the test if torchvision is not installed)."""
  import pytest  # pylint: disable=g-import-not-at-top
  if importlib.util.find_spec('torchvision') is None:
    pytest.skip('torchvision is not installed (pip install ".[test]")')
  try:
    return importlib.import_module('torchvision.models.inception')
  except RuntimeError:  # the C extension does not fit this torch build
    pass
  spec = importlib.util.find_spec('torchvision')
  for name in [n for n in sys.modules if n == 'torchvision' or n.startswith('torchvision.')]:
    del sys.modules[name]  # the half-imported package of the failed attempt
  root = str(pathlib.Path(spec.origin).parent)
  package = types.ModuleType('torchvision')
  package.__path__ = [root]
  package.__spec__ = importlib.machinery.ModuleSpec('torchvision', None, is_package=True)
  package.__spec__.submodule_search_locations = [root]
  sys.modules['torchvision'] = package
  return importlib.import_module('torchvision.models.inception')
