"""`python -m m2mrf_jax.main` with `tests.tiny_model.TinySegmenter` in place of HRNet.

Everything else is the real job: the flags, `jax.distributed`, the grain pipeline, the jitted step
over the device mesh, orbax checkpoints, evaluation and the logs. HRNet-W18 would spend minutes of a
2-core machine compiling in every process; the network is tested elsewhere.

  python -m tests.multiprocess_job --config=configs/demo.py --workdir=DIR [main's flags]
"""
from absl import app

from m2mrf_jax import main
from m2mrf_jax import models
from tests.tiny_model import TinySegmenter

if __name__ == '__main__':
  models.build = TinySegmenter
  app.run(main.main, flags_parser=main.parse_flags)
