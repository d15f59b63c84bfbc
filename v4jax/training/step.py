"""The pure training step: `train_step(state, batch) -> (state, metrics)`, and `eval_step`.

Legend: b batch, t time, v vocab, e experts, l MoE layers (+ MTP), m micro-batches.
Losses: next-token cross-entropy over `loss_mask`, the MTP loss (position t predicts token t+2, where both targets
stay inside the document), an optional z-loss on the log-partition. Token losses are divided by the whole batch's
token count, so accumulating m micro-batches gives exactly the full batch's gradient.
The router bias update (DeepSeek's aux-loss-free balancing) runs after the gradient step on the non-trainable
`extras`: bias += rate * sign(mean load - load), per MoE layer.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from v4jax import model
from v4jax.config import ModelConfig
from v4jax.moe.routing import RouterBias
from v4jax.sharding import Axis, logical_to_spec, mesh_rules, state_shardings, use_rules
from v4jax.training.config import RunConfig, TrainConfig

Batch = dict[str, jax.Array]  # tokens, targets, segment_ids, positions (int32 [b, t]), loss_mask ([b, t])
BATCH_AXES = (Axis.BATCH, Axis.SEQ)


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: nnx.State  # trainable (nnx.Param)
    extras: nnx.State  # non-trainable: router biases, hash tables
    opt_state: optax.OptState
    rng: jax.Array  # uint32 key data

    @property
    def model_state(self) -> nnx.State:
        return nnx.merge_state(self.params, self.extras)


def split_model_state(state: nnx.State) -> tuple[nnx.State, nnx.State]:
    params, extras = nnx.split_state(state, nnx.Param, ...)
    return params, extras


def model_config(run: RunConfig) -> ModelConfig:
    """The model config the step runs: the run's compute dtype and remat policy applied."""
    return run.model.replace(dtype=run.train.compute_dtype, remat=run.train.remat.value)


# ---------------------------------------------------------------------------------------------------------------
# losses


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token cross-entropy and log-partition (both float32 [b, t])."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_z - target_logit, log_z


def losses(cfg: ModelConfig, train: TrainConfig, model_state: nnx.State, batch: Batch, total_tokens: jax.Array):
    """(loss to differentiate, (metrics, expert_load)) for one (micro-)batch."""
    targets = batch["targets"]
    fused = train.loss_chunk > 0
    out = model.apply(cfg, model_state, batch["tokens"], positions=batch["positions"],
                      segment_ids=batch["segment_ids"], targets=targets if fused else None,
                      loss_chunk=train.loss_chunk)
    mask = batch["loss_mask"].astype(jnp.float32)
    ce, log_z = (out.ce, out.log_z) if fused else token_cross_entropy(out.logits, targets)
    ce_sum = jnp.sum(ce * mask)
    loss = ce_sum / total_tokens
    metrics = {"ce_sum": ce_sum, "tokens": jnp.sum(mask)}
    if train.z_loss_weight:
        z_sum = jnp.sum(jnp.square(log_z) * mask)
        loss = loss + train.z_loss_weight * z_sum / total_tokens
        metrics["z_sum"] = z_sum
    if (out.mtp_ce is not None or out.mtp_logits is not None) and train.mtp_loss_weight:
        # position t predicts target t+1 (token t+2): valid when targets t and t+1 both stay in t's document
        mtp_mask = mask[:, :-1] * mask[:, 1:]
        mtp_ce = (out.mtp_ce[:, :-1] if fused
                  else token_cross_entropy(out.mtp_logits[:, :-1], targets[:, 1:])[0])
        mtp_sum = jnp.sum(mtp_ce * mtp_mask)
        loss = loss + train.mtp_loss_weight * mtp_sum / total_tokens
        metrics |= {"mtp_sum": mtp_sum, "mtp_tokens": jnp.sum(mtp_mask)}
    if out.expert_load is not None:
        metrics["dropped_fraction"] = out.dropped_fraction
        metrics["a2a_bytes"] = jnp.sum(out.a2a_bytes)
    return loss, (metrics, out.expert_load)


# ---------------------------------------------------------------------------------------------------------------
# router bias update (outside the gradient)


def moe_rows(cfg: ModelConfig) -> dict[int, int]:
    """Layer index -> its row in `ModelOutput.expert_load`."""
    return {layer: row for row, layer in enumerate(model.moe_layers(cfg))}


def update_router_biases(cfg: ModelConfig, extras: nnx.State, expert_load: jax.Array, rate: float) -> nnx.State:
    """bias += rate * sign(mean load - load) for every learned router (hash layers have no bias)."""
    rows, lay = moe_rows(cfg), model.layout(cfg)
    scanned_end = lay.prefix + lay.unit * lay.repeats

    def layers_of(path) -> list[int]:
        group = path[0]
        if group == "prefix":
            return [path[1]]
        if group == "suffix":
            return [scanned_end + path[1]]
        if group == "mtp":
            return [cfg.num_hidden_layers]
        return [lay.prefix + r * lay.unit + path[2] for r in range(lay.repeats)]  # unit: stacked over repeats

    def update(path, variable):
        if not isinstance(variable, RouterBias):
            return variable
        load = expert_load[jnp.asarray([rows[layer] for layer in layers_of(path)])]  # [n, e]
        step = rate * jnp.sign(load.mean(-1, keepdims=True) - load)
        return variable.replace(variable[...] + step.reshape(variable.shape).astype(variable.dtype))

    return nnx.map_state(update, extras)


# ---------------------------------------------------------------------------------------------------------------
# steps


def micro_batches(batch: Batch, count: int) -> Batch:
    """[b, t] -> [m, b / m, t] for every field."""
    return jax.tree.map(lambda x: x.reshape(count, x.shape[0] // count, *x.shape[1:]), batch)


def train_step(state: TrainState, batch: Batch, *, run: RunConfig, optimizer: optax.GradientTransformation):
    cfg, train = model_config(run), run.train
    total_tokens = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
    grad_fn = jax.value_and_grad(
        lambda params, micro: losses(cfg, train, nnx.merge_state(params, state.extras), micro, total_tokens),
        has_aux=True)

    def accumulate(carry, micro):
        grads, metrics, load = carry
        (_, (m, l)), g = grad_fn(state.params, micro)
        add = functools.partial(jax.tree.map, jnp.add)
        return (add(grads, g), add(metrics, m), None if load is None else load + l), None

    if train.grad_accumulation == 1:
        # No loop around a single micro-batch: XLA copies every donated parameter buffer a loop reads (the update
        # may not overwrite it in place), and the gradient would be added to zeros.
        (_, (metrics, load)), grads = grad_fn(state.params, batch)
    else:
        micros = micro_batches(batch, train.grad_accumulation)
        # One traced gradient (the scan body) however many micro-batches: the carry starts at zeros of its shapes.
        shapes = jax.eval_shape(grad_fn, state.params, jax.tree.map(lambda x: x[0], micros))
        (_, (metrics, load)), grads = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
        (grads, metrics, load), _ = jax.lax.scan(accumulate, (grads, metrics, load), micros)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    extras = state.extras
    if load is not None and train.router_bias_update_rate:
        extras = update_router_biases(cfg, extras, load, train.router_bias_update_rate)
    metrics = summarize(metrics, load, train.grad_accumulation) | {
        "grad_norm": optax.global_norm(grads), "update_norm": optax.global_norm(updates)}
    new_state = state.replace(step=state.step + 1, params=params, extras=extras, opt_state=opt_state)
    return new_state, metrics


def eval_step(state: TrainState, batch: Batch, *, run: RunConfig) -> dict[str, jax.Array]:
    cfg = model_config(run)
    total = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
    _, (metrics, load) = losses(cfg, run.train, state.model_state, batch, total)
    return summarize(metrics, load, 1)


def summarize(metrics: dict, load: jax.Array | None, micro_count: int) -> dict[str, jax.Array]:
    out = {"loss": metrics["ce_sum"] / jnp.maximum(metrics["tokens"], 1.0), "tokens": metrics["tokens"]}
    if "mtp_sum" in metrics:
        out["mtp_loss"] = metrics["mtp_sum"] / jnp.maximum(metrics["mtp_tokens"], 1.0)
    if "z_sum" in metrics:
        out["z_loss"] = metrics["z_sum"] / jnp.maximum(metrics["tokens"], 1.0)
    if load is not None:
        out["expert_load"] = load
        out["dropped_fraction"] = metrics["dropped_fraction"] / micro_count
        # The backward pass transposes every all-to-all into one of the same size: twice the forward's bytes.
        out["a2a_bytes"] = 2 * metrics["a2a_bytes"]
    return out


# ---------------------------------------------------------------------------------------------------------------
# building and jitting


def init_state(run: RunConfig, optimizer: optax.GradientTransformation, key: jax.Array, mesh=None) -> TrainState:
    """A fresh train state on `mesh`, or without one committed to the first local device: where a checkpoint
    restore puts it, so a fresh and a resumed run jit the same program (one compile, one cache entry)."""
    params, extras = split_model_state(model.init(run.model, key, mesh=mesh))
    state = TrainState(step=_replicated(jnp.zeros((), jnp.int32), mesh), params=params, extras=extras,
                       opt_state=_optimizer_init(optimizer, params, mesh)(params),
                       rng=_replicated(jax.random.key_data(jax.random.key(run.train.seed)), mesh))
    return jax.device_put(state, jax.local_devices()[0]) if mesh is None else state


def _replicated(x, mesh):
    return x if mesh is None else jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def _optimizer_init(optimizer, params, mesh):
    """The optimizer's init, jitted so every moment lands in its parameter's sharding (`optimizer_shardings`)."""
    if mesh is None:
        return jax.jit(optimizer.init)
    return jax.jit(optimizer.init, out_shardings=optimizer_shardings(optimizer, params, mesh))


def optimizer_shardings(optimizer: optax.GradientTransformation, params, mesh):
    """Each optimizer-state leaf in its parameter's sharding: a moment has its parameter's shape and that
    parameter's path at the end of its own (`.../mu/embed/embedding/value`). Counts and anything else not shaped
    like a parameter are replicated. (Leaving it to XLA replicates the moments too: zeros carry no sharding to
    propagate, and a 284B-parameter model's moments then need a terabyte per chip.)"""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    by_path = {_keys(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)}

    def sharding(path, leaf):
        keys = _keys(path)
        for start in range(len(keys)):
            param = by_path.get(keys[start:])
            if param is not None and param.shape == leaf.shape:
                return param.sharding
        return replicated

    return jax.tree_util.tree_map_with_path(sharding, jax.eval_shape(optimizer.init, params))


def _keys(path) -> tuple[str, ...]:
    return tuple(str(key) for key in path)


def batch_sharding(mesh) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(mesh, logical_to_spec(BATCH_AXES, mesh_rules(mesh), mesh_shape=dict(mesh.shape)))


def jit_train_step(run: RunConfig, optimizer: optax.GradientTransformation, state: TrainState, mesh=None):
    """`train_step` jitted with the state's shardings in and out, the batch split by the rules, state donated."""
    step = functools.partial(train_step, run=run, optimizer=optimizer)
    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    state_shardings_ = jax.tree.map(lambda a: a.sharding, state)

    rules = mesh_rules(mesh)

    def on_mesh(state, batch):
        # Traced under the mesh: `constrain` pins activations, the MoE can shard_map over `expert` and attention
        # over `context` (a mesh that splits it trains with the sequence split: `mesh_rules`).
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), use_rules(rules):
            return step(state, batch)

    return jax.jit(on_mesh, in_shardings=(state_shardings_, batch_sharding(mesh)),
                   out_shardings=(state_shardings_, None), donate_argnums=0)


def jit_eval_step(run: RunConfig, state: TrainState, mesh=None):
    """`eval_step` jitted like `jit_train_step`: on a mesh traced under it and its rules (so a mesh that splits
    `context` evaluates with the sequence split, as it trains), the state's shardings in, the batch split by the
    rules. Nothing is donated: the next train step still needs the state."""
    fn = functools.partial(eval_step, run=run)
    if mesh is None:
        return jax.jit(fn)
    rules = mesh_rules(mesh)

    def on_mesh(state, batch):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), use_rules(rules):
            return fn(state, batch)

    return jax.jit(on_mesh, in_shardings=(jax.tree.map(lambda a: a.sharding, state), batch_sharding(mesh)))


def abstract_state(run: RunConfig, optimizer: optax.GradientTransformation, mesh=None, rules=None):
    """The train state's shapes, dtypes and shardings, allocating nothing (checkpoint restore target)."""
    params, extras = split_model_state(model.abstract(run.model))
    if mesh is None:
        opt_state = jax.eval_shape(optimizer.init, params)
        scalar_sharding = None
    else:
        params, extras = (jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), part,
                                       state_shardings(part, mesh, rules)) for part in (params, extras))
        opt_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                 jax.eval_shape(optimizer.init, params), optimizer_shardings(optimizer, params, mesh))
        scalar_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    key = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    return TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=scalar_sharding), params=params,
                      extras=extras, opt_state=opt_state,
                      rng=jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=scalar_sharding))
