"""Every row of the paper's operator tables (Table 2 DDR, Table 5 IDRiD) as a config: W48 parameter
counts against Table 2's column, and the down/up paths of an HRModule run forward and backward."""
import importlib
import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from m2mrf_jax import hrnet
from m2mrf_jax import models

# config name -> (down, up, our W48 4-class parameter count, Table 2 Param(M)).
ROWS = {
    'base': ('strideconv', 'bilinear', 65_847_844, 65.85),
    'maxpool_bilinear': ('maxpool', 'bilinear', 59_453_956, 59.45),
    'maxpool_unpool': ('maxpool', 'unpool', 59_453_956, 59.45),
    'lip_bilinear': ('lip', 'bilinear', 75_438_212, 75.44),
    'carafe_bilinear': ('carafe', 'bilinear', 66_303_883, 66.30),
    'strideconv_carafe': ('strideconv', 'carafe', 72_117_644, 72.12),
    'strideconv_deconv': ('strideconv', 'deconv', 73_119_268, 73.12),
    'indexnet': ('indexnet', 'indexnet', 70_677_028, 70.33),  # the closest reading found: +0.35M
    'carafepp': ('carafe', 'carafe', 72_573_683, 72.57),
    'a2u': ('a2u', 'a2u', 66_514_232, 66.51),
    'a': ('m2mrf_onestep', 'm2mrf_onestep', 69_932_536, 69.93),
    'b': ('m2mrf_onestep', 'm2mrf_cascade', 67_154_896, 67.15),
    'c': ('m2mrf_cascade', 'm2mrf_onestep', 70_297_900, 70.30),
    'd': ('m2mrf_cascade', 'm2mrf_cascade', 67_520_260, 67.52),
}
NOT_REACHED = {'indexnet'}


def _config(dataset, name):
  return importlib.import_module(f'configs.{dataset}_{name}').get_config()


def _pair(model_config):
  down, up = hrnet.VARIANTS[model_config.variant]
  return model_config.down or down, model_config.up or up


@pytest.mark.parametrize('name', list(ROWS))
def test_row_configs_pick_the_operators(name):
  for dataset in ('ddr', 'idrid'):
    config = _config(dataset, name)
    assert config.data.name == dataset
    assert _pair(config.model) == ROWS[name][:2]
    assert config.model.width == 48


@pytest.mark.parametrize('name', list(ROWS))
def test_w48_parameter_count_equals_table_2(name):
  _, _, count, paper = ROWS[name]
  model = nnx.eval_shape(lambda: models.build(_config('ddr', name).model, nnx.Rngs(0)))
  params = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert params == count
  if name not in NOT_REACHED:
    assert round(params / 1e6, 2) == paper


def test_paired_up_needs_its_down():
  config = common.model_config('base', 18)
  config.down, config.up = 'strideconv', 'unpool'
  with pytest.raises(ValueError, match="model.up='unpool'.*needs model.down='maxpool'"):
    models.build(config, nnx.Rngs(0))
  config.down, config.up = 'avgpool', 'bilinear'
  with pytest.raises(ValueError, match='model.down must be one of'):
    models.build(config, nnx.Rngs(0))


@pytest.mark.parametrize('name', [n for n in ROWS if n not in 'abcd'])
def test_hrmodule_paths_run_forward_and_backward_on_odd_sizes(name, monkeypatch):
  """A 3-branch HRModule (channels 4, 8, 16, train mode, no BasicBlocks: only the fuse paths) on the
  branch sizes of a 75 x 93 input: every path gives its branch's size, every parameter a gradient."""
  monkeypatch.setattr(hrnet, 'NUM_BLOCKS', 0)
  down, up = ROWS[name][:2]
  rngs = nnx.Rngs(0)
  resampling = hrnet.Resampling(down, up, 8, 4, 64, jnp.float32, rngs)
  module = hrnet.HRModule((4, 8, 16), resampling, dtype=jnp.float32, rngs=rngs)
  sizes = [(19, 24), (10, 12), (5, 6)]  # ceil halvings of 75 x 93 / 4
  rng = np.random.default_rng(0)
  xs = [jnp.asarray(rng.normal(size=(2, *s, c)), jnp.float32) for s, c in zip(sizes, (4, 8, 16))]
  # Random weights: LIP's zero-initialised logit conv would otherwise hide the layers before it.
  for _, variable in nnx.to_flat_state(nnx.state(module, nnx.Param)):
    variable[...] = jnp.asarray(rng.normal(0, 0.3, variable.shape), jnp.float32)

  @nnx.jit
  def outputs_and_grads(m):
    def loss_fn(m):
      ys = m(xs)
      return sum(jnp.mean(jnp.square(y - 1.0)) for y in ys), ys
    return nnx.grad(loss_fn, has_aux=True)(m)

  grads, ys = outputs_and_grads(module)
  assert [y.shape for y in ys] == [x.shape for x in xs]
  assert all(bool(jnp.isfinite(y).all()) for y in ys)
  flat = nnx.to_flat_state(nnx.state(grads, nnx.Param))
  dead = ['.'.join(map(str, k)) for k, g in flat if float(jnp.abs(g[...]).max()) == 0]
  assert not dead, dead
