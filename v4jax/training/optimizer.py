"""Optimizers: the V4 recipe (Muon for hidden matrices, AdamW for the rest), plain AdamW, the LR schedule.

Everything works directly on an `nnx.State` of `nnx.Param`s (a pytree of Variables): filter the model state with
`state.filter(nnx.Param)` (or `nnx.state(model, nnx.Param)`) first. Router biases (`RouterBias`) and hash tables
(`HashTable`) are not parameters of the optimizer: `partition` refuses a state that still holds them.

The partition (V4 paper §2.4 / reference note §6 and §10). First matching row wins; paths are "/"-joined state
paths such as `unit/blocks/0/attn/wq_b`, matched with `re.search`:

    row (path pattern)            label   decay  why
    (^|/)embed/embedding$         adamw   yes    token embedding            [paper: AdamW]
    (^|/)head/kernel$             adamw   yes    prediction head            [paper: AdamW]
    norm/weight$                  adamw   no     every RMSNorm weight       [paper: AdamW]
    (_hc|hc_head)/(base|scale)$   adamw   no     mHC static biases S, gating factors alpha   [paper: AdamW]
    (_hc|hc_head)/fn$             muon    yes    mHC dynamic projections W_pre/W_post/W_res: hidden matrices;
                                                 the paper names only S and alpha for AdamW ("all other modules"
                                                 are Muon). Flip this row to ADAMW to keep them on AdamW.
    /sinks$                       adamw   no     attention sink logits      [paper silent; AdamW is the safe choice]
    /position_bias$               adamw   no     compressor position bias (`ape`)   [paper silent; AdamW]
    router/weight$                muon    yes    router gate [d, experts]: a hidden matrix, not in the paper's
                                                 AdamW list, so Muon ("all other modules")
    (anything else, <= 1-D)       adamw   no     any other vector / scalar
    (anything else, 2-D)          muon    yes    hidden matrices: q/kv/o projections, compressor and indexer
                                                 projections, dense, shared and routed expert MLPs, MTP proj

"1-D / 2-D" counts the dimensions after the stacked axes: leading `layers` (a scanned unit) and `experts` axes are
batch axes, and Muon orthogonalises every layer's / expert's matrix on its own. Parameters stored with extra axes
are matrices over (input axes) x (output axes), declared in `MATRIX_LAYOUTS` (`g` = independent matrices, `i` =
fan-in, `o` = fan-out, one letter per dimension after the stacked axes); a Muon parameter with more than two such
dimensions and no row there is an error, so a new parameter cannot silently get the wrong reshape.

Weight decay is decoupled (`W <- W - lr * (update + wd * W)`) and applies to the rows marked "yes": every Muon
matrix plus the embedding and the head, never norms, biases, sinks, or mHC S/alpha (the paper quotes wd 0.1 for
its AdamW group too, but decaying gains and biases towards zero is not what one wants at our scales).

Muon (paper Alg. 1): Nesterov momentum (M <- mu M + G; orthogonalise mu M + G), hybrid Newton-Schulz (normalise by
the Frobenius norm, 8 steps with (3.4445, -4.7750, 2.0315), then 2 steps with (2, -1.5, 0.5)), update rescaled to
RMS 0.18 (`O = O' * sqrt(max(fan_in, fan_out)) * 0.18`) so that Muon and AdamW share one learning-rate schedule.
We implement it here rather than use `optax.contrib.muon`: its dimension numbers (axes only) cannot express the
MTP `proj` split (V4 stores it as two independent matrices, e_proj and h_proj; we store their concatenation), and
its momentum / scaling conventions differ from the paper's.

Gradient accumulation: `make_optimizer(..., accumulate=True)` wraps the chain in `optax.MultiSteps` when
`train_cfg.grad_accumulation > 1` (the optimizer then averages k calls and applies once; the schedule counts
optimizer steps). A train step that accumulates micro-batches itself passes `accumulate=False`.
"""

from __future__ import annotations

import functools
import math
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from v4jax.training.config import OptimizerKind, TrainConfig

MUON = "muon"
ADAMW = "adamw"

# (path pattern, label, weight decay, why): the partition, first match wins. See the module docstring.
RULES: tuple[tuple[str, str, bool, str], ...] = (
    (r"(^|/)embed/embedding$", ADAMW, True, "token embedding"),
    (r"(^|/)head/kernel$", ADAMW, True, "prediction head"),
    (r"norm/weight$", ADAMW, False, "RMSNorm weight"),
    (r"(_hc|hc_head)/(base|scale)$", ADAMW, False, "mHC static bias / gating factor"),
    (r"(_hc|hc_head)/fn$", MUON, True, "mHC dynamic projection (a hidden matrix)"),
    (r"/sinks$", ADAMW, False, "attention sink logits"),
    (r"/position_bias$", ADAMW, False, "compressor position bias"),
    (r"router/weight$", MUON, True, "router gate (a hidden matrix)"),
)

# (path pattern, dims after the stacked axes): g = independent matrices (batch), i = fan-in, o = fan-out.
# A plain 2-D parameter is "io". Groups must come first, then fan-in, then fan-out (a contiguous reshape).
MATRIX_LAYOUTS: tuple[tuple[str, str], ...] = (
    (r"(^|/)(wq_b|wkv_b)$", "ioo"),  # [q_lora | heads, head_dim], [kv_lora | heads, nope + v]
    (r"(^|/)wo$", "iio"),  # MLA [heads, v_head_dim | embed]
    (r"(^|/)wo_a$", "giio"),  # V4 grouped output [groups | heads/group, head_dim | o_lora]: one matrix per group
    (r"(^|/)wo_b$", "iio"),  # V4 [groups, o_lora | embed]: one matrix over all groups
    (r"(^|/)mtp/proj$", "2io"),  # [2d | d] = V4's e_proj and h_proj stacked on fan-in: two matrices
)

STACKED_AXES = ("layers", "experts")  # leading logical axes that are batch axes for Muon
MUON_UPDATE_RMS = 0.18
NS_COEFFS = ((3.4445, -4.7750, 2.0315),) * 8 + ((2.0, -1.5, 0.5),) * 2


# ---------------------------------------------------------------------------------------------------------------
# the partition


def _path_str(path) -> str:
    if isinstance(path, str):
        return path
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):  # jax key entries (DictKey, SequenceKey, GetAttrKey)
            if hasattr(key, attr):
                key = getattr(key, attr)
                break
        parts.append(str(key))
    return "/".join(parts)


def _shape(variable: nnx.Variable) -> tuple[int, ...] | None:
    value = variable.get_value()
    shape = getattr(value, "shape", None)
    return None if shape is None else tuple(shape)


def _n_stacked(variable: nnx.Variable) -> int:
    n = 0
    for axis in getattr(variable, "logical_axes", None) or ():
        if axis not in STACKED_AXES:
            break
        n += 1
    return n


def _ndim(variable: nnx.Variable) -> int:
    shape = _shape(variable)
    if shape is not None:
        return len(shape)
    axes = getattr(variable, "logical_axes", None)
    if axes is None:
        raise ValueError(f"cannot tell the rank of {variable!r}")
    return len(axes)


def _rule(path, variable: nnx.Variable) -> tuple[str, bool] | None:
    if not isinstance(variable, nnx.Param):
        return None
    name = _path_str(path)
    for pattern, label, decay, _ in RULES:
        if re.search(pattern, name):
            return label, decay
    matrix_ndim = _ndim(variable) - _n_stacked(variable)
    if matrix_ndim <= 1:
        return ADAMW, False
    return MUON, True


def label_of(path, variable: nnx.Variable) -> str | None:
    """"muon" or "adamw" for a parameter (path: a "/"-joined string or a key tuple); None for a non-Param."""
    rule = _rule(path, variable)
    return None if rule is None else rule[0]


def decays(path, variable: nnx.Variable) -> bool:
    """Whether decoupled weight decay applies to this parameter (matrices, embedding, head)."""
    rule = _rule(path, variable)
    return rule is not None and rule[1]


class MatrixView(NamedTuple):
    """How Muon sees a parameter: `stacked` batch dims, then `groups` independent [fan_in, fan_out] matrices."""
    stacked: tuple[int, ...]
    groups: int
    fan_in: int
    fan_out: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.stacked, self.groups, self.fan_in, self.fan_out)


def matrix_view(path, variable: nnx.Variable, shape: tuple[int, ...] | None = None) -> MatrixView:
    """The per-matrix reshape of a Muon parameter (from MATRIX_LAYOUTS and its stacked axes)."""
    name = _path_str(path)
    shape = tuple(shape) if shape is not None else _shape(variable)
    n_stacked = _n_stacked(variable)
    stacked, dims = shape[:n_stacked], shape[n_stacked:]
    layout = next((spec for pattern, spec in MATRIX_LAYOUTS if re.search(pattern, name)), None)
    if layout is None:
        if len(dims) != 2:
            raise ValueError(f"{name}: a Muon parameter with matrix dims {dims} (after stacked axes {stacked}) needs "
                             f"a row in optimizer.MATRIX_LAYOUTS")
        layout = "io"
    if layout[0].isdigit():  # "2io": the first fan-in dim holds that many independent matrices stacked
        split, letters = int(layout[0]), layout[1:]
        if len(dims) != len(letters) or dims[0] % split:
            raise ValueError(f"{name}: layout {layout!r} does not fit dims {dims}")
        dims = (split, dims[0] // split, *dims[1:])
        letters = "g" + letters
    else:
        letters = layout
    if len(dims) != len(letters) or letters != "".join(sorted(letters, key="gio".index)) or "i" not in letters \
            or "o" not in letters:
        raise ValueError(f"{name}: layout {layout!r} does not fit dims {dims}")
    size = lambda letter: math.prod(d for d, l in zip(dims, letters) if l == letter)
    return MatrixView(stacked, size("g"), size("i"), size("o"))


def _map_params(fn, tree, what: str):
    """Map fn(path, variable) -> new value over every Variable of an nnx.State (MaskedNodes pass through)."""

    def visit(keypath, node):
        if isinstance(node, optax.MaskedNode):
            return node
        if not isinstance(node, nnx.Variable):
            raise TypeError(f"{what} expects an nnx.State of nnx.Param Variables; got a bare {type(node).__name__} "
                            f"at {_path_str(keypath)}")
        if isinstance(node.get_value(), optax.MaskedNode):
            return node
        new = fn(_path_str(keypath), node)
        return jax.tree.map(lambda _: new, node)  # keep the Variable (and its metadata): same tree structure

    return jax.tree_util.tree_map_with_path(visit, tree,
                                            is_leaf=lambda x: isinstance(x, (nnx.Variable, optax.MaskedNode)))


def _params_only(path, variable, fn):
    if not isinstance(variable, nnx.Param):
        raise ValueError(f"{path} is a {type(variable).__name__}, not an nnx.Param: filter the state with "
                         f"state.filter(nnx.Param) before handing it to the optimizer")
    return fn(path, variable)


def partition(params: nnx.State) -> nnx.State:
    """The same tree with each parameter's label ("muon" | "adamw") as its leaf."""

    def label(path, variable):
        lab = label_of(path, variable)
        if lab == MUON:
            matrix_view(path, variable)  # fail now, not at trace time, on a matrix we cannot reshape
        return lab

    return _map_params(lambda p, v: _params_only(p, v, label), params, "partition")


def decay_mask(params: nnx.State) -> nnx.State:
    """The same tree with True where decoupled weight decay applies."""
    return _map_params(lambda p, v: _params_only(p, v, decays), params, "decay_mask")


# ---------------------------------------------------------------------------------------------------------------
# Muon


def orthogonalise(x: jax.Array, coeffs=NS_COEFFS, eps: float = 1e-7) -> jax.Array:
    """Approximate U V^T of each [..., m, n] matrix: Frobenius normalisation, then Newton-Schulz (V4's hybrid)."""
    x = x.astype(jnp.float32)
    transpose = x.shape[-2] > x.shape[-1]  # iterate on the side with the smaller Gram matrix
    if transpose:
        x = jnp.swapaxes(x, -1, -2)
    x = x / (jnp.sqrt(jnp.sum(jnp.square(x), axis=(-2, -1), keepdims=True)) + eps)

    def step(x, abc):
        a, b, c = abc[0], abc[1], abc[2]
        gram = x @ jnp.swapaxes(x, -1, -2)
        return a * x + (b * gram + c * gram @ gram) @ x, None

    # one scan over the per-step coefficients: a single small loop body per tensor (cheap to compile)
    x, _ = jax.lax.scan(step, x, jnp.asarray(coeffs, jnp.float32))
    return jnp.swapaxes(x, -1, -2) if transpose else x


def _per_layer(fn, matrices: jax.Array, view: MatrixView) -> jax.Array:
    """fn over a scanned unit's stacked matrices one layer at a time (`lax.map`): Newton-Schulz holds Gram
    matrices, and for every layer of V4-Flash's stacked experts at once they are ~10 GB per weight per device."""
    lead = math.prod(view.stacked)
    if lead <= 1:
        return fn(matrices)
    per_layer = matrices.reshape(lead, *view.shape[len(view.stacked):])
    return jax.lax.map(fn, per_layer).reshape(view.shape)


class MuonState(NamedTuple):
    momentum: optax.Updates


def scale_by_muon(momentum: float = 0.95, update_rms: float = MUON_UPDATE_RMS, *, nesterov: bool = True,
                  coeffs=NS_COEFFS) -> optax.GradientTransformation:
    """Muon's direction for every parameter it sees (all must be matrices per `matrix_view`); no learning rate."""

    def init_fn(params):
        return MuonState(momentum=jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates, state, params=None):
        del params
        buf = jax.tree.map(lambda m, g: momentum * m + g, state.momentum, updates)
        direction = jax.tree.map(lambda m, g: momentum * m + g, buf, updates) if nesterov else buf

        def orth(path, variable):
            x = variable.get_value()
            view = matrix_view(path, variable, x.shape)
            o = _per_layer(functools.partial(orthogonalise, coeffs=coeffs), x.reshape(view.shape), view)
            scale = math.sqrt(max(view.fan_in, view.fan_out)) * update_rms
            return (o * scale).reshape(x.shape).astype(x.dtype)

        return _map_params(orth, direction, "scale_by_muon"), MuonState(momentum=buf)

    return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------------------------------------------------
# schedule and the optimizer


def schedule(train_cfg: TrainConfig) -> optax.Schedule:
    """Linear warm-up 0 -> learning_rate over warmup_steps, then cosine to learning_rate * min_ratio at `steps`."""
    peak = float(train_cfg.learning_rate)
    floor = peak * float(train_cfg.min_learning_rate_ratio)
    warmup, total = int(train_cfg.warmup_steps), int(train_cfg.steps)

    def lr(count):
        t = jnp.asarray(count, jnp.float32)
        warm = peak * t / max(warmup, 1)
        progress = jnp.clip((t - warmup) / max(total - warmup, 1), 0.0, 1.0)
        cosine = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(t < warmup, warm, cosine)

    return lr


def make_optimizer(train_cfg: TrainConfig, params: nnx.State | None = None, *,
                   accumulate: bool = True) -> optax.GradientTransformation:
    """Clip -> (Muon | AdamW per `partition`, or AdamW everywhere) -> decoupled decay -> -schedule.

    `params` (optional) is checked up front: a non-Param Variable or a matrix without a layout raises here rather
    than at trace time. `update` needs `params` (for weight decay). With accumulate and grad_accumulation > 1 the
    chain is wrapped in `optax.MultiSteps` (averaging grad_accumulation calls per optimizer step).
    """
    if params is not None:
        partition(params)
    adam = optax.scale_by_adam(b1=train_cfg.adam_b1, b2=train_cfg.adam_b2, eps=train_cfg.adam_eps)
    if train_cfg.optimizer == OptimizerKind.MUON:
        direction = optax.multi_transform({MUON: scale_by_muon(train_cfg.muon_momentum), ADAMW: adam}, partition)
    else:
        direction = adam
    parts = []
    if train_cfg.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(train_cfg.grad_clip_norm))
    parts.append(direction)
    if train_cfg.weight_decay > 0:
        parts.append(optax.add_decayed_weights(train_cfg.weight_decay, mask=decay_mask))
    parts.append(optax.scale_by_learning_rate(schedule(train_cfg)))
    tx = optax.chain(*parts)
    if accumulate and train_cfg.grad_accumulation > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=train_cfg.grad_accumulation).gradient_transformation()
    return tx


def learning_rate(opt_state, train_cfg: TrainConfig) -> jax.Array:
    """The learning rate the next optimizer step will use (for metrics): the schedule at the step count."""
    counts = [s.count for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByScheduleState))
              if isinstance(s, optax.ScaleByScheduleState)]
    return schedule(train_cfg)(counts[0] if counts else 0)
