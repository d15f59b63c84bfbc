"""The transformer: embed -> prefix layers -> scanned repeating unit -> suffix layers -> norm -> head (+ MTP).

Legend: b batch, t time, d model, v vocab, e experts.
The pattern's explicit layer list is split into an unrolled prefix, a unit repeated `repeats` times (its parameters
stacked on a leading `layers` axis and run with `lax.scan`) and an unrolled suffix, chosen to compile the fewest
distinct layers, so compile time follows the unit, not the depth. Modules are used functionally: `init` returns an
`nnx.State`, `apply` merges it with a cached graph definition inside the caller's trace.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx, struct

from v4jax import attention
from v4jax.attention import cached as cached_attention, context
from v4jax.config import LayerSpec, MlpKind, ModelConfig
from v4jax.layers.cross_entropy import head_cross_entropy
from v4jax.layers.hyper import HyperConnection, HyperHead, expand
from v4jax.layers.linear import Embed, Head, fill_random, param, read
from v4jax.layers.mlp import MLP
from v4jax.layers.norm import RMSNorm
from v4jax.moe.moe import MoE
from v4jax.sharding import Axis, constrain, get_rules, state_shardings

ACTIVATION = (Axis.BATCH, Axis.SEQ, Axis.EMBED)
STREAMS = (Axis.BATCH, Axis.SEQ, Axis.STREAMS, Axis.EMBED)  # the mHC residual [b, t, hc, d]
# vmap-stacked variables gain a leading `layers` entry in their `logical_axes` (Flax's own sharding key is unused).
STACKED = {nnx.PARTITION_NAME: Axis.LAYERS.value, "logical_axes": Axis.LAYERS.value}


# ---------------------------------------------------------------------------------------------------------------
# layout: which layers are unrolled and which are scanned


@dataclasses.dataclass(frozen=True)
class Layout:
    prefix: int  # layers [0, prefix) unrolled
    unit: int  # then `repeats` copies of a `unit`-layer block, scanned
    repeats: int
    suffix: int  # then the last `suffix` layers unrolled

    def locate(self, layer: int) -> tuple[str, int, int]:
        """Layer index -> (group, repeat, position): ("prefix", 0, i), ("unit", r, j) or ("suffix", 0, i)."""
        scanned_end = self.prefix + self.unit * self.repeats
        if layer < self.prefix:
            return "prefix", 0, layer
        if layer < scanned_end:
            repeat, position = divmod(layer - self.prefix, self.unit)
            return "unit", repeat, position
        return "suffix", 0, layer - scanned_end


def find_layout(specs: tuple[LayerSpec, ...], scan: bool = True) -> Layout:
    """The prefix / repeated unit / suffix split with the fewest distinct layers to compile (ties: shorter unit)."""
    n = len(specs)
    best = Layout(prefix=n, unit=0, repeats=0, suffix=0)
    if not scan:
        return best
    best_cost = n
    for unit in range(1, n // 2 + 1):
        for start in range(0, n - 2 * unit + 1):
            block = specs[start:start + unit]
            repeats = 1
            while specs[start + repeats * unit:start + (repeats + 1) * unit] == block:
                repeats += 1
            if repeats < 2:
                continue
            suffix = n - start - repeats * unit
            cost = start + unit + suffix
            if cost < best_cost:
                best, best_cost = Layout(start, unit, repeats, suffix), cost
    return best


def layout(cfg: ModelConfig) -> Layout:
    return find_layout(cfg.layers, cfg.scan_layers)


def moe_layers(cfg: ModelConfig) -> list[int]:
    """The layers behind the rows of `ModelOutput.expert_load`: MoE layers in depth order, then the MTP block
    (index num_hidden_layers) when it has routed experts."""
    layers = [i for i, spec in enumerate(cfg.layers) if spec.mlp is not MlpKind.DENSE]
    if cfg.num_nextn_predict_layers and cfg.mlp_kind(cfg.num_hidden_layers) is not MlpKind.DENSE:
        layers.append(cfg.num_hidden_layers)
    return layers


# ---------------------------------------------------------------------------------------------------------------
# modules


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)).

    With hc_mult > 1 the residual is mHC streams [b, t, hc, d]: each site collapses them into the sub-layer's
    input and `expand`s its output back (V4); hc_mult = 1 is the plain residual, so every family shares the block.
    """

    def __init__(self, cfg: ModelConfig, spec: LayerSpec, rngs: nnx.Rngs):
        eps, std = cfg.rms_norm_eps, cfg.initializer_range
        self.attn_norm = RMSNorm(cfg.hidden_size, Axis.EMBED, eps=eps, rngs=rngs)
        self.attn = attention.make(cfg, spec.attention, rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, Axis.EMBED, eps=eps, rngs=rngs)
        self.mlp = (MLP(cfg.hidden_size, cfg.intermediate_size, std=std, rngs=rngs) if spec.mlp is MlpKind.DENSE
                    else MoE(cfg, rngs, spec.mlp))
        self.attn_hc = HyperConnection(cfg, rngs) if cfg.hc_mult > 1 else None
        self.mlp_hc = HyperConnection(cfg, rngs) if cfg.hc_mult > 1 else None
        self.remat = cfg.remat

    def __call__(self, x, positions, segment_ids, tokens):
        with jax.named_scope("attention"):
            x, _ = self.residual(x, self.attn_hc, lambda h: (
                context.attend(self.attn, self.attn_norm(h), positions, segment_ids), None))
        with jax.named_scope("mlp"):
            return self.residual(x, self.mlp_hc, lambda h: self.feed_forward(self.mlp_norm(h), tokens))

    def extend(self, x, cache, start, count, tokens, fresh: bool = False):
        """The block over a chunk of new tokens with the layer's attention cache (serving): -> (x, cache).
        `fresh`: every row's cache is empty (start = 0), so a prompt can be prefilled with its sequence split over
        `context` (`context.prefill`)."""
        def attend(h):
            if fresh:
                return context.prefill(self.attn, h, cache, count)
            return cached_attention.extend(self.attn, h, cache, start, count)

        with jax.named_scope("attention"):
            x, cache = self.residual(x, self.attn_hc, lambda h: attend(self.attn_norm(h)))
        with jax.named_scope("mlp"):
            x, _ = self.residual(x, self.mlp_hc, lambda h: self.feed_forward(self.mlp_norm(h), tokens))
        return x, cache

    def feed_forward(self, h, tokens):
        if isinstance(self.mlp, MoE):
            return self.mlp(h, tokens)
        return self.mlp(h), None

    @staticmethod
    def residual(x, hc, sublayer):
        """x + sublayer(x) on the plain residual, or through an mHC site on streams. Returns (x, extra)."""
        if hc is None:
            out, extra = sublayer(x)
            return constrain(x + out, ACTIVATION), extra
        collapsed, post, comb = hc(x)
        out, extra = sublayer(collapsed)
        return constrain(expand(out, x, post, comb), STREAMS), extra


class Unit(nnx.Module):
    """One repetition of the pattern's repeating unit."""

    def __init__(self, cfg: ModelConfig, specs: tuple[LayerSpec, ...], rngs: nnx.Rngs):
        self.blocks = nnx.List([Block(cfg, spec, rngs) for spec in specs])

    def __call__(self, x, positions, segment_ids, tokens):
        stats = []
        for block in self.blocks:
            x, block_stats = run_block(block, x, positions, segment_ids, tokens)
            stats.append(block_stats)
        return x, tuple(stats)


def run_block(block: Block, x, positions, segment_ids, tokens):
    """A block call, rematerialised in the backward pass as `cfg.remat` says (saves activation memory)."""
    remat = block.remat
    if remat == "none":
        return block(x, positions, segment_ids, tokens)
    graphdef, state = nnx.split(block)
    checkpoint_policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable if remat == "dots"
                         else jax.checkpoint_policies.nothing_saveable)

    @functools.partial(jax.checkpoint, policy=checkpoint_policy)
    def run(state, x):
        return nnx.merge(graphdef, state)(x, positions, segment_ids, tokens)

    return run(state, x)


def _stacked_unit(cfg: ModelConfig, specs: tuple[LayerSpec, ...], repeats: int, rngs: nnx.Rngs) -> Unit | None:
    """`repeats` independently initialised copies of the unit, stacked on a leading `layers` axis."""
    if not repeats:
        return None

    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata=STACKED)
    def stacked(unit_rngs):
        return Unit(cfg, specs, unit_rngs)

    return stacked(rngs.split(repeats))


class MTP(nnx.Module):
    """Multi-token prediction (depth 1): from the main stack's state at t and the embedding of token t+1,
    predict token t+2.

    x = proj([norm(embed(t+1)); norm(h_t)]) -> one block -> (collapse) -> norm -> the shared head. V3 stores `proj`
    as one [2d, d] matrix; V4 as e_proj and h_proj, which are its two halves, and feeds every mHC stream of the
    main state (before the final collapse) with the embedding term broadcast over streams. The block attends with
    a window in V4 models and with full MLA otherwise; it is never hash-routed.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        eps, d = cfg.rms_norm_eps, cfg.hidden_size
        self.embed_norm = RMSNorm(d, Axis.EMBED, eps=eps, rngs=rngs)
        self.hidden_norm = RMSNorm(d, Axis.EMBED, eps=eps, rngs=rngs)
        self.proj = param(rngs, (2 * d, d), (None, Axis.EMBED), std=cfg.initializer_range)
        self.block = Block(cfg, LayerSpec(cfg.mtp_attention, cfg.mlp_kind(cfg.num_hidden_layers)), rngs)
        self.hc_head = HyperHead(cfg, rngs) if cfg.hc_mult > 1 else None
        self.norm = RMSNorm(d, Axis.EMBED, eps=eps, rngs=rngs)

    def __call__(self, hidden, next_embedding, positions, segment_ids, tokens):
        embedded = self.embed_norm(next_embedding)
        if hidden.ndim == 4:  # mHC streams: the embedding term is shared by every stream
            embedded = jnp.broadcast_to(embedded[:, :, None], hidden.shape)
        joined = jnp.concatenate([embedded, self.hidden_norm(hidden)], axis=-1)
        x = jnp.einsum("...c,cd->...d", joined, read(self.proj, hidden.dtype))
        x, stats = self.block(x, positions, segment_ids, tokens)
        if self.hc_head is not None:
            x = self.hc_head(x)
        return self.norm(x), stats


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        specs, lay, std = cfg.layers, layout(cfg), cfg.initializer_range
        self.cfg = cfg
        self.embed = Embed(cfg.vocab_size, cfg.hidden_size, std=std, rngs=rngs)
        self.prefix = nnx.List([Block(cfg, specs[i], rngs) for i in range(lay.prefix)])
        self.unit = _stacked_unit(cfg, specs[lay.prefix:lay.prefix + lay.unit], lay.repeats, rngs)
        self.suffix = nnx.List([Block(cfg, specs[i], rngs) for i in range(cfg.num_hidden_layers - lay.suffix,
                                                                            cfg.num_hidden_layers)])
        self.hc_head = HyperHead(cfg, rngs) if cfg.hc_mult > 1 else None
        self.norm = RMSNorm(cfg.hidden_size, Axis.EMBED, eps=cfg.rms_norm_eps, rngs=rngs)
        self.head = None if cfg.tie_word_embeddings else Head(cfg.hidden_size, cfg.vocab_size, std=std, rngs=rngs)
        self.mtp = MTP(cfg, rngs) if cfg.num_nextn_predict_layers else None

    def logits(self, h: jax.Array) -> jax.Array:
        if self.head is None:
            return jnp.einsum("btd,vd->btv", h, read(self.embed.embedding, h.dtype),
                              preferred_element_type=jnp.float32)
        return self.head(h)

    def output_kernel(self) -> jax.Array:
        """The head's [d, v] matrix (the embedding's transpose when tied), in its parameter dtype."""
        return self.embed.embedding[...].T if self.head is None else self.head.kernel[...]

    def token_losses(self, h: jax.Array, targets: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
        """(cross-entropy, log-partition) float32 [b, t] of the head on h against targets, no logits kept."""
        with jax.named_scope("head_cross_entropy"):
            return head_cross_entropy(h, self.output_kernel(), targets, chunk)

    def __call__(self, tokens, positions, segment_ids, targets=None, loss_chunk: int = 0) -> ModelOutput:
        dtype = jnp.dtype(self.cfg.dtype)
        x = constrain(self.embed(tokens, dtype), ACTIVATION)
        if self.cfg.hc_mult > 1:
            x = constrain(jnp.broadcast_to(x[:, :, None], (*x.shape[:2], self.cfg.hc_mult, x.shape[-1])), STREAMS)
        stats = []
        for group in self.groups():
            with jax.named_scope(group[0]):
                x, group_stats = group[1](x, positions, segment_ids, tokens)
            stats.extend(group_stats)
        h = self.norm(x if self.hc_head is None else self.hc_head(x))
        losses = {}
        if targets is None:
            losses["logits"] = self.logits(h)
        else:
            losses["ce"], losses["log_z"] = self.token_losses(h, targets, loss_chunk)
        if self.mtp is not None:
            with jax.named_scope("mtp"):
                next_tokens = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
                h, mtp_stats = self.mtp(x, self.embed(next_tokens, dtype), positions, segment_ids, next_tokens)
                if targets is None:
                    losses["mtp_logits"] = self.logits(h)
                else:  # position t predicts target t+1; the last position's pad target is the caller's to mask
                    next_targets = jnp.concatenate([targets[:, 1:], jnp.zeros_like(targets[:, :1])], axis=1)
                    losses["mtp_ce"] = self.token_losses(h, next_targets, loss_chunk)[0]
                stats.append(mtp_stats)
        moe = [s for s in stats if s is not None]
        return ModelOutput(
            **losses,
            expert_load=jnp.stack([s["expert_load"] for s in moe]) if moe else None,
            dropped_fraction=jnp.stack([s["dropped_fraction"] for s in moe]) if moe else None,
            a2a_bytes=jnp.stack([s["a2a_bytes"] for s in moe]) if moe else None,
        )

    def extend(self, tokens, caches, start, count, *, last: jax.Array | None = None, fresh: bool = False):
        """Serving: append a chunk tokens int [b, t] to per-row caches, (prefix, unit, suffix) tuples of layer
        caches (the unit's stacked over repeats), where row b holds start[b] tokens and count[b] of its chunk are
        real. Returns (logits float32 [b, t, v], caches); with `last` int [b], only the logits at chunk position
        last[b] ([b, 1, v]: a prefill needs no others). `fresh` as in `Block.extend`. The MTP block is not run."""
        dtype = jnp.dtype(self.cfg.dtype)
        x = constrain(self.embed(tokens, dtype), ACTIVATION)
        if self.cfg.hc_mult > 1:
            x = jnp.broadcast_to(x[:, :, None], (*x.shape[:2], self.cfg.hc_mult, x.shape[-1]))

        def unrolled(blocks, layer_caches, x):
            updated = []
            for block, cache in zip(blocks, layer_caches):
                x, cache = block.extend(x, cache, start, count, tokens, fresh)
                updated.append(cache)
            return x, tuple(updated)

        prefix_caches, unit_caches, suffix_caches = caches
        with jax.named_scope("prefix"):
            x, prefix_caches = unrolled(self.prefix, prefix_caches, x)
        if self.unit is not None:
            graphdef, stacked = nnx.split(self.unit)

            def body(x, inputs):
                unit_state, unit_cache = inputs
                return unrolled(nnx.merge(graphdef, unit_state).blocks, unit_cache, x)

            with jax.named_scope("scanned_unit"):
                x, unit_caches = jax.lax.scan(body, x, (stacked, unit_caches))
        with jax.named_scope("suffix"):
            x, suffix_caches = unrolled(self.suffix, suffix_caches, x)
        if last is not None:
            x = jax.vmap(lambda row, at: jax.lax.dynamic_slice_in_dim(row, at, 1))(x, last)
        logits = self.logits(self.norm(x if self.hc_head is None else self.hc_head(x)))
        return logits, (prefix_caches, unit_caches, suffix_caches)

    def groups(self):
        """(name, fn) pairs in layer order; each fn maps (x, positions, segment_ids) -> (x, per-layer stats list)."""
        def unrolled(blocks):
            def run(x, positions, segment_ids, tokens):
                stats = []
                for block in blocks:
                    x, block_stats = run_block(block, x, positions, segment_ids, tokens)
                    stats.append(block_stats)
                return x, stats
            return run

        yield "prefix", unrolled(self.prefix)
        if self.unit is not None:
            yield "scanned_unit", self.scan_unit
        yield "suffix", unrolled(self.suffix)

    def scan_unit(self, x, positions, segment_ids, tokens):
        graphdef, stacked = nnx.split(self.unit)

        def body(x, unit_state):
            return nnx.merge(graphdef, unit_state)(x, positions, segment_ids, tokens)

        x, stats = jax.lax.scan(body, x, stacked)  # stats: per block, leaves stacked over repeats
        repeats = jax.tree.leaves(stacked)[0].shape[0]
        # Back to layer order: repeat-major, then position in the unit.
        return x, [jax.tree.map(lambda a: a[r], block_stats) for r in range(repeats) for block_stats in stats]


@struct.dataclass
class ModelOutput:
    expert_load: jax.Array | None  # float32 [moe layers (+ MTP), e]: routed assignments per expert
    dropped_fraction: jax.Array | None  # float32 [moe layers (+ MTP)]
    a2a_bytes: jax.Array | None = None  # float32 [moe layers (+ MTP)]: bytes the expert-parallel all-to-alls moved
    # without targets: the logits
    logits: jax.Array | None = None  # float32 [b, t, v]
    mtp_logits: jax.Array | None = None  # float32 [b, t, v]: position t predicts token t+2
    # with targets (the fused head + cross-entropy; no logits): float32 [b, t]
    ce: jax.Array | None = None
    log_z: jax.Array | None = None
    mtp_ce: jax.Array | None = None  # position t against target t + 1; the last position is padding


# ---------------------------------------------------------------------------------------------------------------
# functional API


def _build(cfg: ModelConfig, key) -> Transformer:
    return Transformer(cfg, nnx.Rngs(params=key))


@functools.lru_cache(maxsize=64)
def graphdef(cfg: ModelConfig) -> nnx.GraphDef:
    return nnx.split(nnx.eval_shape(lambda: _build(cfg, jax.random.key(0))))[0]


def abstract(cfg: ModelConfig, mesh: jax.sharding.Mesh | None = None, rules=None) -> nnx.State:
    """Shapes, dtypes and (with a mesh) shardings of every parameter, allocating nothing."""
    state = in_param_dtype(cfg, nnx.split(nnx.eval_shape(lambda: _build(cfg, jax.random.key(0))))[1])
    if mesh is None:
        return state
    shardings = state_shardings(state, mesh, rules)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)


def in_param_dtype(cfg: ModelConfig, state: nnx.State) -> nnx.State:
    """Floating trainable parameters in `cfg.param_dtype` (bfloat16 halves a served model's weights; layers read
    them in the compute dtype). Non-trainable state (router biases, hash tables) keeps its own dtype."""
    dtype = jnp.dtype(cfg.param_dtype)

    def cast(variable):
        if not isinstance(variable, nnx.Param) or not jnp.issubdtype(variable.dtype, jnp.floating):
            return variable
        value = variable.get_value()
        if isinstance(value, jax.ShapeDtypeStruct):
            return variable.replace(jax.ShapeDtypeStruct(value.shape, dtype))
        return variable.replace(value.astype(dtype))  # numpy (a loaded checkpoint) or jax arrays alike

    return jax.tree.map(cast, state, is_leaf=lambda v: isinstance(v, nnx.Variable))


def init(cfg: ModelConfig, key: jax.Array, mesh: jax.sharding.Mesh | None = None, rules=None) -> nnx.State:
    """Random parameters, created directly in their shardings when a mesh is given (nothing is gathered)."""
    if mesh is None:
        return _init_fn(cfg, None, None)(key)
    rules_key = tuple(sorted(get_rules(rules).items()))
    with jax.set_mesh(mesh):
        return _init_fn(cfg, mesh, rules_key)(key)


@functools.lru_cache(maxsize=16)
def _init_fn(cfg: ModelConfig, mesh, rules_key):
    """One compiled initialiser per (config, mesh, rules)."""
    shardings = None if mesh is None else state_shardings(abstract(cfg), mesh, dict(rules_key))
    return jax.jit(lambda key: fill_random(abstract(cfg), key), out_shardings=shardings)


def apply(cfg: ModelConfig, params: nnx.State, tokens: jax.Array, *, positions: jax.Array | None = None,
          segment_ids: jax.Array | None = None, targets: jax.Array | None = None,
          loss_chunk: int = 128) -> ModelOutput:
    """The full forward pass (traceable; call inside your own jit). tokens int32 [b, t].

    Without `targets`: the logits. With int targets [b, t]: per-token losses instead (`ce`, `log_z`, `mtp_ce`),
    the head fused with the cross-entropy `loss_chunk` positions at a time, so no [b, t, v] array exists."""
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be int [batch, time], got shape {tokens.shape}")
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    if segment_ids is None:
        segment_ids = jnp.zeros(tokens.shape, jnp.int32)
    model = nnx.merge(graphdef(cfg), params)
    return model(tokens, positions, segment_ids, targets, loss_chunk)


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, tokens, positions, segment_ids):
    return apply(cfg, params, tokens, positions=positions, segment_ids=segment_ids).logits


def forward(cfg: ModelConfig, params: nnx.State, tokens: jax.Array, *, positions=None, segment_ids=None):
    """Logits float32 [b, t, vocab] for int32 tokens [b, t]; jitted, runs under the current mesh."""
    return _forward(cfg, params, jnp.asarray(tokens, jnp.int32), positions, segment_ids)


def param_counts(cfg: ModelConfig, include_mtp: bool = False) -> tuple[int, int]:
    """(total, active) parameters from `abstract` (nothing allocated).

    Active = what one token uses: everything but the embedding table (a lookup, unless tied to the head) and the
    routed experts it is not sent to (k of E). Non-trainable state (router bias) is not counted.
    """
    total = active = 0
    for path, variable in nnx.to_flat_state(abstract(cfg)):
        if not isinstance(variable, nnx.Param) or (path[0] == "mtp" and not include_mtp):
            continue
        size = variable.size
        total += size
        if path[:2] == ("embed", "embedding") and not cfg.tie_word_embeddings:
            continue  # a lookup; when tied it is also the output head, which every token multiplies by
        active += size * cfg.num_experts_per_tok // cfg.n_routed_experts if "experts" in path else size
    return total, active


# ---------------------------------------------------------------------------------------------------------------
# per-layer views (checkpoint conversion, scanned <-> unscanned)


def split_layers(cfg: ModelConfig, params: nnx.State) -> tuple[dict, list[dict]]:
    """Params -> (everything but the layers, one pure dict of arrays per layer in depth order)."""
    pure = nnx.to_pure_dict(params)
    lay = layout(cfg)
    layers = []
    for i in range(cfg.num_hidden_layers):
        group, repeat, position = lay.locate(i)
        if group == "unit":
            layers.append(jax.tree.map(lambda a: a[repeat], pure["unit"]["blocks"][position]))
        else:
            layers.append(pure[group][position])
    rest = {k: v for k, v in pure.items() if k not in ("prefix", "unit", "suffix")}
    return rest, layers


def merge_layers(cfg: ModelConfig, rest: dict, layers: list[dict], mesh=None, rules=None) -> nnx.State:
    """The inverse of `split_layers` for any `cfg` with the same layer kinds (e.g. scanned <-> unscanned)."""
    if len(layers) != cfg.num_hidden_layers:
        raise ValueError(f"expected {cfg.num_hidden_layers} layers, got {len(layers)}")
    lay = layout(cfg)
    pure = dict(rest)
    groups = {"prefix": range(lay.prefix), "suffix": range(cfg.num_hidden_layers - lay.suffix,
                                                            cfg.num_hidden_layers)}
    for group, indices in groups.items():
        if indices:
            pure[group] = {position: layers[i] for position, i in enumerate(indices)}
    if lay.repeats:
        pure["unit"] = {"blocks": {
            j: jax.tree.map(lambda *a: jnp.stack(a), *[layers[lay.prefix + r * lay.unit + j]
                                                       for r in range(lay.repeats)])
            for j in range(lay.unit)}}
    state = abstract(cfg)
    nnx.replace_by_pure_dict(state, pure)
    return place(in_param_dtype(cfg, state), mesh, rules)


def place(state: nnx.State, mesh=None, rules=None) -> nnx.State:
    """Host or device arrays -> device arrays in the shardings the rules give (default device without a mesh)."""
    if mesh is None:
        return jax.tree.map(jnp.asarray, state)
    return jax.device_put(state, state_shardings(state, mesh, rules))
