"""The two layer layouts of a :class:`~models.Decoder`, and conversions between them.

* unrolled (``scan_layers=False``): ``layers/i/...``, one set of parameters per block, the
  Hugging Face naming;
* scanned (``scan_layers=True``): ``layers/...`` with a leading layer axis ``L`` on every
  parameter, the blocks run by ``nnx.scan`` (MaxText's and Levanter's layout).

Both compute the same function; :func:`scan_layers` and :func:`unscan_layers` copy a model
from one to the other. :func:`stacked_layers` tells ``lbw_optax.guard`` which parameters stack
layers, so that each layer is limited as a tensor of its own.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lbw.models.decoder import Decoder


def _key(entry: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(entry, attribute):
            return str(getattr(entry, attribute))
    return str(entry)


def stacked_layers(params: Any) -> Any:
    """A tree of bools like ``params``: true for the parameters of a scanned model's stacked
    blocks (everything under ``layers``). Pass it as ``lbw_optax.guard(..., stacked=...)``.

    Example:
      >>> import dataclasses, lbw_optax
      >>> from lbw import models
      >>> config = dataclasses.replace(models.tiny_qwen2_5_3b(), scan_layers=True)
      >>> tx = lbw_optax.lbw_adamw(1e-3, stacked=models.stacked_layers)
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: _key(path[0]) == "layers", params)


def _converted(model: Decoder, scanned: bool) -> Decoder:
    config = dataclasses.replace(model.config, scan_layers=scanned)
    target = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(target)
    source = {tuple(_key(k) for k in path): v for path, v in nnx.to_flat_state(nnx.state(model))}
    layers = range(config.num_layers)
    for path, variable in nnx.to_flat_state(state):
        names = tuple(_key(k) for k in path)
        if names[0] != "layers":
            value = source[names][...]
        elif scanned:  # layers/<rest> <- stack of layers/i/<rest>
            value = jnp.stack([source[("layers", str(i), *names[1:])][...] for i in layers])
        else:  # layers/i/<rest> <- layers/<rest>[i]
            value = source[("layers", *names[2:])][...][int(names[1])]
        variable.set_value(jnp.asarray(value, variable.dtype))
    return nnx.merge(graphdef, state)


def scan_layers(model: Decoder) -> Decoder:
    """A copy of ``model`` in the scanned layout (its blocks' parameters stacked)."""
    if model.config.scan_layers:
        raise ValueError("the model is already scanned (config.scan_layers=True)")
    return _converted(model, scanned=True)


def unscan_layers(model: Decoder) -> Decoder:
    """A copy of ``model`` in the unrolled layout (one block per layer)."""
    if not model.config.scan_layers:
        raise ValueError("the model is already unrolled (config.scan_layers=False)")
    return _converted(model, scanned=False)
