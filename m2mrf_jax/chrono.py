"""`Chrono`: steps per second and ETA of the training loop, not counting compilation or pauses."""
import contextlib
import time


class Chrono:
  """Times the loop between reports; the time inside `paused()` (checkpoints, evaluation) is left out.

  The window opens after the first step of the run (whose time is mostly compilation). Usage:
    chrono = Chrono(num_steps)
    ... after each step: chrono.step_done(step)
    ... at a log step: steps_per_sec, eta_sec = chrono.measure(step)   # (None, None) the first time
    with chrono.paused(): save()
  """

  def __init__(self, num_steps: int):
    self.num_steps = num_steps
    self._start = None  # (time, step) where the current window opened
    self._paused = 0.0

  def step_done(self, step: int) -> None:
    if self._start is None:
      self._start, self._paused = (time.perf_counter(), step), 0.0

  def measure(self, step: int):
    """(steps per second, seconds left) over the window up to `step`, then opens a new window."""
    if self._start is None or step == self._start[1]:
      return None, None
    now = time.perf_counter()
    steps_per_sec = (step - self._start[1]) / max(now - self._start[0] - self._paused, 1e-9)
    self._start, self._paused = (now, step), 0.0
    return steps_per_sec, (self.num_steps - step) / steps_per_sec

  @contextlib.contextmanager
  def paused(self):
    start = time.perf_counter()
    try:
      yield
    finally:
      self._paused += time.perf_counter() - start


def hms(seconds: float) -> str:
  """Seconds as H:MM:SS."""
  return f'{int(seconds) // 3600}:{int(seconds) // 60 % 60:02d}:{int(seconds) % 60:02d}'
