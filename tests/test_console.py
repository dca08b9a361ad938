"""The console of a tiny training run: the project's lines by default, the libraries' with --verbosity."""
import collections
import io
import logging as py_logging
import re
import sys

from absl import logging
import pytest

from m2mrf_jax import console
from m2mrf_jax import train
from tests import test_train

pytestmark = pytest.mark.usefixtures('fast_compile', 'tiny_model')
tiny_model = test_train.tiny_model
# absl's format: I1202 01:22:33.123456 140234 train.py:175] message
LINE = re.compile(r'^([DIWEF])\d{4} [\d:.]+\s+\d+ (\S+):\d+\] (.*)$')
OWN_FILES = {'train.py', 'checkpoints.py', 'evaluate.py', 'summary.py', 'chrono.py', 'report.py'}


@pytest.fixture
def console_lines(monkeypatch):
  """Runs the absl handler into a buffer; returns run(verbosity, workdir) -> [(level, file, message)]."""
  logging.use_absl_handler()
  handler = logging.get_absl_handler()
  previous = logging.get_verbosity()

  def run(verbosity, workdir):
    buffer = io.StringIO()
    monkeypatch.setattr(sys, 'stderr', buffer)  # before flag parsing absl writes to sys.stderr
    monkeypatch.setattr(handler.python_handler, 'stream', buffer)
    logging.set_verbosity(verbosity)  # what --verbosity does
    console.setup(verbosity)
    config = test_train._config()  # 6 steps, a log window and a checkpoint every 2
    train.train(config, str(workdir), test_train._train_data(config), test_train._evaluate)
    return [m.groups() for m in map(LINE.match, buffer.getvalue().splitlines()) if m]

  yield run
  for f in [f for f in handler.filters if isinstance(f, console.LibraryFilter)]:
    handler.removeFilter(f)
  for name in console.LIBRARY_LOGGERS:
    py_logging.getLogger(name).setLevel(py_logging.NOTSET)
  logging.set_verbosity(previous)


def test_default_console_has_one_line_per_window_checkpoint_and_evaluation(console_lines, tmp_path):
  lines = console_lines(0, tmp_path)
  info = [(f, m) for level, f, m in lines if level == 'I']
  assert {f for f, _ in info} <= OWN_FILES, collections.Counter(f for f, _ in info)  # no orbax INFO
  windows = [m for _, m in info if re.match(r'step \d+/6  loss ', m)]
  assert [m.split()[1] for m in windows] == ['2/6', '4/6', '6/6']
  assert all('lr ' in m for m in windows)
  assert 'images/s  ETA ' in windows[-1]  # from the second window on (the first step is compilation)
  assert [m.split()[2] for _, m in info if m.startswith('checkpoint: step')] == ['2', '4', '6']
  assert sum(m.startswith('step 6: mAUPR') for _, m in info) == 1


def test_verbosity_brings_the_library_lines_back(console_lines, tmp_path):
  quiet = console_lines(0, tmp_path / 'quiet')
  verbose = console_lines(1, tmp_path / 'verbose')
  library = [f for level, f, _ in verbose if level == 'I' and f not in OWN_FILES]
  assert library and 'checkpoint_manager.py' in library  # orbax's INFO lines
  assert not [f for level, f, _ in quiet if level == 'I' and f not in OWN_FILES]


def test_library_filter_levels():
  own = train.__file__
  library = py_logging.__file__.replace('logging', 'asyncio')  # the standard library counts as one
  site = '/venv/lib/python3.11/site-packages/orbax/checkpoint/checkpoint_manager.py'

  def passes(level, pathname, verbosity):
    record = py_logging.LogRecord('absl', level, pathname, 1, 'm', (), None)
    return console.LibraryFilter(console.library_level(verbosity)).filter(record)
  assert [passes(py_logging.INFO, p, 0) for p in (own, library, site)] == [True, False, False]
  assert [passes(py_logging.WARNING, p, 0) for p in (own, library, site)] == [True, True, True]
  assert [passes(py_logging.INFO, p, 1) for p in (own, library, site)] == [True, True, True]
  assert [passes(py_logging.DEBUG, p, 1) for p in (own, library, site)] == [True, False, False]
  assert [passes(py_logging.DEBUG, p, 2) for p in (own, library, site)] == [True, True, True]
