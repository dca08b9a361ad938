"""The console: the project's own log lines, the libraries' (orbax, jax, grain, TFDS...) from WARNING.

`setup(verbosity)` after flag parsing (absl's --verbosity, -v): at 0 (the default) a library record
below WARNING is dropped; at 1 its INFO lines come back, at 2 and more its DEBUG lines too. orbax, grain
and TFDS log through absl, so a record is told apart by the file that logged it: a library is a file
under site-packages (or dist-packages) outside this project's packages, or of the standard library
(asyncio's DEBUG lines).
"""
import logging as py_logging
import os
import sysconfig

from absl import logging

import data_pipelines
import m2mrf_jax

# Libraries that log under their own python logger names (set to the same level: no record is made).
LIBRARY_LOGGERS = ('jax', 'orbax', 'grain', 'tensorflow_datasets', 'etils', 'flax', 'tensorstore')
_OWN = tuple(os.path.dirname(p.__file__) + os.sep for p in (m2mrf_jax, data_pipelines))
_LIBRARY_DIRS = (os.sep + 'site-packages' + os.sep, os.sep + 'dist-packages' + os.sep)
_STDLIB = os.path.join(sysconfig.get_paths()['stdlib'], '')


def library_level(verbosity):
  """The lowest level shown of a library's records at absl verbosity `verbosity`."""
  return py_logging.WARNING if verbosity <= 0 else py_logging.INFO if verbosity == 1 else py_logging.DEBUG


def is_library(pathname):
  """Whether a record logged from file `pathname` is a library's (not this project's)."""
  if pathname.startswith(_OWN):
    return False
  return any(d in pathname for d in _LIBRARY_DIRS) or pathname.startswith(_STDLIB)


class LibraryFilter(py_logging.Filter):
  """Drops library records below `level`; the project's own pass (absl's verbosity decides)."""

  def __init__(self, level):
    super().__init__()
    self.level = level

  def filter(self, record):
    return record.levelno >= self.level or not is_library(record.pathname)


def setup(verbosity=None):
  """Filters the absl handler (every record of the process goes through it) for `verbosity`.

  Args:
    verbosity: absl's verbosity (--verbosity); the flag's value if None.
  """
  level = library_level(logging.get_verbosity() if verbosity is None else verbosity)
  for name in LIBRARY_LOGGERS:
    py_logging.getLogger(name).setLevel(level)
  handler = logging.get_absl_handler()
  for f in [f for f in handler.filters if isinstance(f, LibraryFilter)]:
    handler.removeFilter(f)
  handler.addFilter(LibraryFilter(level))
