"""Routed-expert dispatch: grouped matmuls on one device, and expert parallelism over the mesh's `expert` axis.

Legend: b batch, t time, n tokens (b*t), d model, e experts, l experts local to one shard, p expert-parallel shards
(e = p*l), c capacity slots per expert, f expert width, k top-k, a assignments (n*k), r rows (assignments, or the
rows a shard received from its peers), g groups of a grouped matmul.

Every implementation honours one contract, `routed(cfg, ffn, x [b,t,d], weights [b,t,k], indices [b,t,k]) ->
Dispatched(y [b,t,d], dropped [b,t,k] bool, a2a_bytes)`: y is the weighted sum of each token's kept experts; a
dropped assignment contributes nothing (the shared expert and the residual still carry its token) and is reported.

On one device (GSPMD shards them like any other op):
  dense      every expert on every token, weighted by the (mostly zero) combine matrix: the numerics reference;
  einsum     assignments packed by expert into capacity-padded [e, c, d] buffers, one batched einsum (the CPU
             default: XLA:CPU's ragged_dot runs 30-90x slower than an einsum of the same FLOPs); with exact
             capacity (no capacity factor) into single-expert blocks of BLOCK_ROWS rows instead (`blocked`: about
             a + e x block rows computed, not the e x n an exact capacity buffer needs);
  ragged     assignments sorted by expert, `jax.lax.ragged_dot` over the groups (dropless; TPU/GPU).
Expert parallel, inside `shard_map` (weights [l, d, f] per shard; embed gathered, `expert_mlp` optionally split
over `tensor`, whose partial sums are added by one psum at the end):
  ep_a2a     each shard packs its assignments into [p, l, c, d] at a fixed capacity per (source, expert), one
             `all_to_all` over `expert` delivers them, the local experts run one batched einsum, a second
             `all_to_all` brings the results home. Fixed shapes: runs on XLA:CPU and TPU alike.
  ep_ragged  the same exchange with `jax.lax.ragged_all_to_all`: only real rows travel, into a receive buffer of
             p*a rows (dropless) or ceil(cf*a) rows with a capacity factor; the local experts run the grouped
             matmul of the backend. Where the backend lacks the collective (XLA:CPU) an all_to_all of padded chunks
             with the same semantics stands in, so the layout logic is tested everywhere.
  ep_psum    decode mode: tokens replicated over `expert`, every shard runs its local experts on the tokens routed
             to them, one psum adds the shards' outputs. No all-to-all; the right choice for a few tokens.
`auto` picks by backend, mesh and token count (`resolve_impl`).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from v4jax.config import ModelConfig, MoeImpl, capacity
from v4jax.layers.mlp import swiglu
from v4jax.sharding import Axis, dividing_axes, get_rules, logical_to_spec, mesh_axes

EXPERT_PARALLEL = frozenset({MoeImpl.EP_A2A, MoeImpl.EP_RAGGED, MoeImpl.EP_PSUM})
_ACCELERATORS = ("tpu", "gpu", "cuda", "rocm")


class FFN(NamedTuple):
    """Stacked SwiGLU expert weights in the compute dtype: gate, up [g, d, f], down [g, f, d]."""

    gate: jax.Array
    up: jax.Array
    down: jax.Array
    limit: float | None = None  # V4's swiglu_limit


class Dispatched(NamedTuple):
    y: jax.Array  # [b, t, d]
    dropped: jax.Array  # bool [b, t, k]: assignments dropped for capacity
    a2a_bytes: jax.Array  # float32 []: bytes this layer's all-to-alls moved between devices (0 without EP)


# ---------------------------------------------------------------------------------------------------------------
# grouped matmuls (local to a device)


def ffn_buffers(w: FFN, buffer: jax.Array) -> jax.Array:
    """[g, c, d] capacity buffers through their group's expert -> [g, c, d]."""
    h = swiglu(jnp.einsum("gcd,gdf->gcf", buffer, w.gate), jnp.einsum("gcd,gdf->gcf", buffer, w.up), w.limit)
    return jnp.einsum("gcf,gfd->gcd", h, w.down)


def ffn_ragged(w: FFN, rows: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """rows [r, d] sorted by group, group_sizes [g] -> [r, d] (rows past sum(group_sizes) come out zero)."""
    h = swiglu(jax.lax.ragged_dot(rows, w.gate, group_sizes), jax.lax.ragged_dot(rows, w.up, group_sizes), w.limit)
    return jax.lax.ragged_dot(h, w.down, group_sizes)


def slots(row_group: jax.Array, n_groups: int, cap: int) -> jax.Array:
    """Each row's flat slot `group * cap + rank within its group` in a [g * cap] buffer; g * cap (one past the end)
    for a row past its group's capacity or with group id n_groups (not for this buffer). Ranks follow row order,
    so earlier rows keep their slot."""
    order = jnp.argsort(row_group, stable=True)
    sorted_group = row_group[order]
    counts = jnp.bincount(row_group, length=n_groups + 1)
    starts = jnp.cumsum(counts) - counts
    rank = jnp.arange(row_group.size) - starts[sorted_group]
    kept = (sorted_group < n_groups) & (rank < cap)
    slot_sorted = jnp.where(kept, sorted_group * cap + rank, n_groups * cap)
    return jnp.zeros_like(slot_sorted).at[order].set(slot_sorted)


def to_buffers(rows: jax.Array, slot: jax.Array, n_groups: int, cap: int) -> jax.Array:
    """rows [r, d] -> [g, c, d] at their slots (rows without one are left out)."""
    buffer = jnp.zeros((n_groups * cap, rows.shape[-1]), rows.dtype).at[slot].set(rows, mode="drop")
    return buffer.reshape(n_groups, cap, -1)


def from_buffers(buffer: jax.Array, slot: jax.Array) -> jax.Array:
    """[g, c, d] -> rows [r, d] read back from their slots (zero for rows without one)."""
    return buffer.reshape(-1, buffer.shape[-1]).at[slot].get(mode="fill", fill_value=0)


# Rows per block of `blocked` (the dropless einsum): padding costs at most one block per group.
BLOCK_ROWS = 128


def block_slots(row_group: jax.Array, n_groups: int, block: int) -> tuple[jax.Array, jax.Array]:
    """Dropless packing into blocks of `block` rows that each belong to one group: every row's flat slot (rows of
    one group contiguous, each group padded to whole blocks; one past the end for rows of group g, not here) and
    every block's group. Padding adds under one block per non-empty group, so ceil((r + min(g, r) * (block - 1))
    / block) blocks always suffice (spare blocks: group 0, empty); at decode (block 1) that is r, one per row."""
    r = row_group.size
    n_blocks = -(-(r + min(n_groups, r) * (block - 1)) // block)
    order = jnp.argsort(row_group, stable=True)
    sorted_group = row_group[order]
    counts = jnp.bincount(row_group, length=n_groups + 1)[:n_groups]
    padded = -(-counts // block) * block
    padded_ends = jnp.cumsum(padded)
    rank = jnp.arange(row_group.size) - (jnp.cumsum(counts) - counts)[jnp.minimum(sorted_group, n_groups - 1)]
    here = sorted_group < n_groups
    slot_sorted = jnp.where(here, (padded_ends - padded)[jnp.minimum(sorted_group, n_groups - 1)] + rank,
                            n_blocks * block)
    block_group = jnp.searchsorted(padded_ends, jnp.arange(n_blocks) * block, side="right")
    return jnp.zeros_like(slot_sorted).at[order].set(slot_sorted), jnp.where(block_group < n_groups, block_group, 0)


def blocked(w: FFN, rows: jax.Array, row_group: jax.Array, block: int = BLOCK_ROWS) -> tuple[jax.Array, jax.Array]:
    """The dropless grouped matmul as one batched einsum: rows packed into single-group blocks (`block_slots`),
    each block through its group's weights (gathered per block). Computes at most r + g * block rows where exact
    capacity buffers compute g * r: on CPU, where ragged_dot is slow, the exact alternative to capacity padding."""
    n_groups = w.gate.shape[0]
    block = max(1, min(block, -(-row_group.size // n_groups)))
    if block == 1:  # no more rows than groups (decode): every row is its own block, in place; nothing to pack
        here = row_group < n_groups
        group = jnp.where(here, row_group, 0)
        per_row = FFN(w.gate[group], w.up[group], w.down[group], w.limit)
        return jnp.where(here[:, None], ffn_buffers(per_row, rows[:, None])[:, 0], 0), here
    slot, block_group = block_slots(row_group, n_groups, block)
    n_blocks = block_group.shape[0]
    per_block = FFN(w.gate[block_group], w.up[block_group], w.down[block_group], w.limit)
    out = from_buffers(ffn_buffers(per_block, to_buffers(rows, slot, n_blocks, block)), slot)
    return out, slot < n_blocks * block


def grouped(w: FFN, rows: jax.Array, row_group: jax.Array, impl: MoeImpl, cap: int) -> tuple[jax.Array, jax.Array]:
    """rows [r, d], row_group [r] in [0, g] (g: no group here) -> (out [r, d], kept [r] bool).

    einsum: capacity buffers of `cap` slots per group; ragged: ragged_dot over the sorted rows (dropless)."""
    n_groups = w.gate.shape[0]
    if impl is MoeImpl.EINSUM:
        slot = slots(row_group, n_groups, cap)
        out = from_buffers(ffn_buffers(w, to_buffers(rows, slot, n_groups, cap)), slot)
        return out, slot < n_groups * cap
    order = jnp.argsort(row_group, stable=True)
    group_sizes = jnp.bincount(row_group, length=n_groups + 1)[:n_groups].astype(jnp.int32)
    out_sorted = ffn_ragged(w, rows[order], group_sizes)
    kept = row_group < n_groups
    out = jnp.zeros_like(out_sorted).at[order].set(out_sorted)
    return jnp.where(kept[:, None], out, 0), kept


def combine(per_assignment: jax.Array, weights: jax.Array) -> jax.Array:
    """per_assignment [a, d] in (token, slot) order, weights float32 [n, k] -> [n, d] (summed in float32)."""
    n, k = weights.shape
    y = jnp.einsum("nkd,nk->nd", per_assignment.reshape(n, k, -1).astype(jnp.float32), weights)
    return y.astype(per_assignment.dtype)


def assignment_rows(x: jax.Array, k: int) -> jax.Array:
    """x [n, d] -> [a, d]: token i's row repeated for each of its k experts, in (token, slot) order."""
    return jnp.repeat(x, k, axis=0)


def target_platform() -> str:
    """The platform the code is being traced for: the current mesh's devices (a TPU pod's, when compiling ahead of
    time on a CPU host: `aot.py`), else the default backend."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def local_impl() -> MoeImpl:
    """The grouped matmul for this backend: ragged_dot where it is fast (TPU, GPU), capacity einsum on CPU."""
    return MoeImpl.RAGGED if target_platform() in _ACCELERATORS else MoeImpl.EINSUM


# ---------------------------------------------------------------------------------------------------------------
# the mesh layout of expert parallelism


class Layout(NamedTuple):
    """Where tokens and expert weights live inside the shard_map, from the current mesh and sharding rules."""

    mesh: jax.sharding.AbstractMesh
    ep: tuple[str, ...]  # mesh axes the experts are split over (p = their product)
    tp: tuple[str, ...]  # mesh axes the expert width is split over (partial sums, one psum)
    tokens: P  # of [b, t, ...]: split as the rules split batch and seq (ep axes forced in, or removed for psum)
    p: int

    @property
    def token_shards(self) -> int:
        shape = dict(self.mesh.shape)
        return math.prod(shape[a] for entry in self.tokens for a in mesh_axes(entry))

    @property
    def gate_spec(self) -> P:
        return P(self.ep or None, None, self.tp or None)

    @property
    def down_spec(self) -> P:
        return P(self.ep or None, self.tp or None, None)


def width_axis(cfg: ModelConfig) -> Axis:
    """The logical axis of an expert's width: `mlp` (split over `tensor` like the dense MLPs) with
    `expert_tensor_parallel`, else `expert_mlp` (whole in every preset: each expert lives on one device)."""
    return Axis.MLP if cfg.expert_tensor_parallel else Axis.EXPERT_MLP


def layout(cfg: ModelConfig, b: int, t: int, *, tokens_over_ep: bool) -> Layout | None:
    """The EP layout under the current mesh, or None without a mesh. `tokens_over_ep` splits the tokens over the
    expert axes (a2a, ragged: required; None when they cannot be split), else keeps them whole there (psum)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    shape, rules = dict(mesh.shape), get_rules()
    ep = mesh_axes(logical_to_spec((Axis.EXPERTS,), rules, mesh_shape=shape)[0])
    p = math.prod(shape[a] for a in ep)
    if cfg.n_routed_experts % p:
        raise ValueError(f"{cfg.n_routed_experts} routed experts cannot be split over mesh axes {ep} of size {p}")
    tp = tuple(a for a in mesh_axes(logical_to_spec((width_axis(cfg),), rules, mesh_shape=shape)[0]) if a not in ep)
    tp = dividing_axes(tp, cfg.moe_intermediate_size, shape)
    batch, seq = (mesh_axes(e) for e in logical_to_spec((Axis.BATCH, Axis.SEQ), rules, mesh_shape=shape))
    batch, seq = (tuple(a for a in axes if a not in tp and a not in ep) for axes in (batch, seq))
    batch = dividing_axes(batch, b, shape)
    seq = dividing_axes(seq, t, shape)
    if tokens_over_ep:
        missing = [a for a in ep if a not in batch + seq]
        for axis in missing:  # batch first, then seq, wherever the split still divides
            if b % (math.prod(shape[a] for a in batch) * shape[axis]) == 0:
                batch += (axis,)
            elif t % (math.prod(shape[a] for a in seq) * shape[axis]) == 0:
                seq += (axis,)
            else:
                return None
    return Layout(mesh, ep, tp, P(batch or None, seq or None), p)


_RAGGED_SUPPORT: dict[str, bool] = {}


def ragged_all_to_all_supported(platform: str) -> bool:
    """Feature detection: does this backend compile `ragged_all_to_all`? (XLA:CPU does not.) Compiles a tiny
    exchange over two of the platform's devices once per platform (`probe_ragged_all_to_all`); nothing runs."""
    if platform not in _RAGGED_SUPPORT:
        try:
            devices = jax.devices(platform)
        except RuntimeError:  # no such backend in this process (a TPU pod compiled for on a CPU host)
            devices = []
        probe_ragged_all_to_all(devices)
    return _RAGGED_SUPPORT.get(platform, False)


def probe_ragged_all_to_all(devices) -> bool:
    """Run the feature probe on these devices (which need not be local: `aot.py` passes a TPU topology's) and
    remember the answer for their platform."""
    devices = list(devices)[:2]
    if len(devices) < 2:
        return False
    _RAGGED_SUPPORT[devices[0].platform] = supported = _compiles_ragged_all_to_all(devices)
    return supported


def _compiles_ragged_all_to_all(devices) -> bool:
    mesh = jax.sharding.Mesh(np.array(devices), ("x",))

    def exchange(x, sizes):
        zeros = jnp.zeros(2, jnp.int32)
        return jax.lax.ragged_all_to_all(x, jnp.zeros_like(x), zeros, sizes, zeros, sizes, axis_name="x")

    f = jax.shard_map(exchange, mesh=mesh, in_specs=(P("x"), P("x")), out_specs=P("x"))
    try:
        jax.jit(f).lower(jax.ShapeDtypeStruct((8,), jnp.float32), jax.ShapeDtypeStruct((4,), jnp.int32)).compile()
    except Exception:  # noqa: BLE001 - any compile failure means "not supported here"
        return False
    return True


def resolve_impl(cfg: ModelConfig, b: int, t: int) -> MoeImpl:
    """`auto`: without an expert-split mesh, the local grouped matmul of the backend; with one, ep_psum when the
    tokens cannot be split over the expert shards or there are fewer assignments per shard than experts (decode),
    else ep_ragged where the backend has ragged_all_to_all and ep_a2a where it does not."""
    impl = MoeImpl(cfg.moe_impl)
    if impl is not MoeImpl.AUTO:
        return impl
    split = layout(cfg, b, t, tokens_over_ep=True)
    if split is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty or layout(cfg, b, t, tokens_over_ep=False).p == 1:
            return local_impl()
        return MoeImpl.EP_PSUM
    if split.p == 1:
        return local_impl()
    if b * t // split.token_shards * cfg.num_experts_per_tok <= cfg.n_routed_experts:
        return MoeImpl.EP_PSUM
    return MoeImpl.EP_RAGGED if ragged_all_to_all_supported(target_platform()) else MoeImpl.EP_A2A


# ---------------------------------------------------------------------------------------------------------------
# entry point


def routed(cfg: ModelConfig, w: FFN, x: jax.Array, weights: jax.Array, indices: jax.Array) -> Dispatched:
    """x [b, t, d], weights float32 [b, t, k], indices int32 [b, t, k] -> Dispatched (see the module docstring)."""
    b, t, _ = x.shape
    impl = resolve_impl(cfg, b, t)
    if impl in EXPERT_PARALLEL:
        return _expert_parallel(cfg, impl, w, x, weights, indices)
    if impl is not MoeImpl.DENSE and (lay := _token_split(cfg, b, t)) is not None:
        return _per_shard(cfg, impl, lay, w, x, weights, indices)
    return _local(cfg, impl, w, x, weights, indices)


def _local(cfg: ModelConfig, impl: MoeImpl, w: FFN, x, weights, indices) -> Dispatched:
    b, t, d = x.shape
    flat, k = x.reshape(b * t, d), indices.shape[-1]
    if impl is MoeImpl.DENSE:
        y, kept = _dense(w, flat, weights.reshape(b * t, k), indices.reshape(b * t, k)), None
    else:
        rows, row_group = assignment_rows(flat, k), indices.reshape(-1)
        if impl is MoeImpl.EINSUM and cfg.capacity_factor is None:  # exact: blocks, not g x tokens of buffers
            out, kept = blocked(w, rows, row_group)
        else:
            out, kept = grouped(w, rows, row_group, impl, capacity(cfg, b * t))
        y = combine(out, weights.reshape(b * t, k))
    dropped = jnp.zeros(indices.shape, bool) if kept is None else ~kept.reshape(indices.shape)
    return Dispatched(y.reshape(b, t, d), dropped, jnp.zeros((), jnp.float32))


def _token_split(cfg: ModelConfig, b: int, t: int) -> Layout | None:
    """The token split of a mesh without expert parallelism (every expert on every device), or None where the
    tokens are whole or the expert width is split (GSPMD then partitions the matmuls)."""
    lay = layout(cfg, b, t, tokens_over_ep=False)
    if lay is None or lay.p > 1 or lay.tp or lay.token_shards == 1:
        return None
    return lay


def _per_shard(cfg, impl, lay: Layout, w: FFN, x, weights, indices) -> Dispatched:
    """The local grouped matmul on each token shard (data or context split, experts replicated). Under GSPMD the
    token sort and the capacity buffers would span every shard's tokens ([e, all tokens, d] per device with exact
    capacity); per shard they hold its own, and capacity counts its own tokens, as ep_a2a's does."""
    tok3 = P(*lay.tokens, None)

    def body(gate, up, down, x, weights, indices):
        return _local(cfg, impl, FFN(gate, up, down, w.limit), x, weights, indices)[:2]

    fn = jax.shard_map(body, mesh=lay.mesh, in_specs=(P(), P(), P(), tok3, tok3, tok3), out_specs=(tok3, tok3))
    with jax.named_scope(f"moe_{impl.value}_per_shard"):
        y, dropped = fn(w.gate, w.up, w.down, x, weights, indices)
    return Dispatched(y, dropped, jnp.zeros((), jnp.float32))


def _dense(w: FFN, x: jax.Array, weights: jax.Array, indices: jax.Array) -> jax.Array:
    h = swiglu(jnp.einsum("nd,edf->nef", x, w.gate), jnp.einsum("nd,edf->nef", x, w.up), w.limit)
    out = jnp.einsum("nef,efd->ned", h, w.down)
    combine_matrix = jnp.zeros((x.shape[0], w.gate.shape[0]), jnp.float32)
    combine_matrix = combine_matrix.at[jnp.arange(x.shape[0])[:, None], indices].add(weights)
    return jnp.einsum("ned,ne->nd", out.astype(jnp.float32), combine_matrix).astype(x.dtype)


def _expert_parallel(cfg, impl, w, x, weights, indices) -> Dispatched:
    b, t, _ = x.shape
    lay = layout(cfg, b, t, tokens_over_ep=impl is not MoeImpl.EP_PSUM)
    if lay is None and jax.sharding.get_abstract_mesh().empty:
        raise ValueError(f"moe_impl={impl.value!r} runs inside shard_map over the mesh's expert axis: trace it under "
                         "a mesh (jax.set_mesh, or train/serve on one) or use moe_impl='auto'")
    if lay is None:  # fewer token rows than expert shards (a decode step): replicated tokens are exact
        impl, lay = MoeImpl.EP_PSUM, layout(cfg, b, t, tokens_over_ep=False)
    body = {MoeImpl.EP_A2A: _a2a_body, MoeImpl.EP_RAGGED: _ragged_body, MoeImpl.EP_PSUM: _psum_body}[impl]
    tok3 = P(*lay.tokens, None)
    fn = jax.shard_map(functools.partial(body, cfg, lay, w.limit), mesh=lay.mesh,
                       in_specs=(lay.gate_spec, lay.gate_spec, lay.down_spec, tok3, tok3, tok3),
                       out_specs=(tok3, tok3, P()))
    with jax.named_scope(f"moe_{impl.value}"):
        y, dropped, sent = fn(w.gate, w.up, w.down, x, weights, indices)
    return Dispatched(y, dropped, sent)


def _flat(x, weights, indices):
    b, t, k = indices.shape
    return x.reshape(b * t, -1), weights.reshape(b * t, k), indices.reshape(-1)


def _finish(lay: Layout, y, shape, dropped, sent_bytes, reduce_axes=()) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Add the partial sums (expert width over tp, plus `reduce_axes`), restore [b, t, ...], total the bytes."""
    axes = tuple(reduce_axes) + lay.tp
    if axes:
        y = jax.lax.psum(y, axes)
    return y.reshape(*shape[:2], -1), dropped.reshape(shape), _device_sum(jnp.asarray(sent_bytes, jnp.float32), lay)


def _device_sum(value: jax.Array, lay: Layout) -> jax.Array:
    """Sum over every device of the mesh (a value equal across some axes still counts once per device there)."""
    axes = tuple(lay.mesh.axis_names)
    # psum needs an operand that varies over all its axes; adding 0 * axis_index makes it so on any JAX version.
    value = value + 0.0 * jax.lax.axis_index(axes).astype(jnp.float32)
    return jax.lax.psum(value, axes)


def _psum_body(cfg, lay, limit, gate, up, down, x, weights, indices):
    flat, wts, experts = _flat(x, weights, indices)
    n_local = gate.shape[0]
    local = experts - jax.lax.axis_index(lay.ep) * n_local if lay.ep else experts
    mine = (local >= 0) & (local < n_local)
    # The same capacity over the same tokens as the one-device einsum: identical drops (none when exact).
    out, kept = grouped(FFN(gate, up, down, limit), assignment_rows(flat, indices.shape[-1]),
                        jnp.where(mine, local, n_local), local_impl(), capacity(cfg, flat.shape[0]))
    dropped = mine & ~kept
    if lay.ep:
        dropped = jax.lax.psum(dropped.astype(jnp.int32), lay.ep) > 0
    return _finish(lay, combine(out, wts), indices.shape, dropped, 0.0, lay.ep)


def _a2a_body(cfg, lay, limit, gate, up, down, x, weights, indices):
    flat, wts, experts = _flat(x, weights, indices)
    (p, e), (n, d) = (lay.p, cfg.n_routed_experts), flat.shape
    n_local, cap = e // p, capacity(cfg, n)
    slot = slots(experts, e, cap)
    send = to_buffers(assignment_rows(flat, indices.shape[-1]), slot, e, cap).reshape(p, n_local, cap, d)
    recv = _all_to_all(send, lay.ep)  # [p (source), l, c, d]
    out = ffn_buffers(FFN(gate, up, down, limit), recv.transpose(1, 0, 2, 3).reshape(n_local, p * cap, d))
    back = _all_to_all(out.reshape(n_local, p, cap, d).transpose(1, 0, 2, 3), lay.ep)  # [p (expert shard), l, c, d]
    per_assignment = from_buffers(back.reshape(e, cap, d), slot)
    # Both exchanges move the whole fixed buffer, less the part a shard keeps.
    sent = 2 * (p - 1) / p * send.size * send.dtype.itemsize
    return _finish(lay, combine(per_assignment, wts), indices.shape, slot >= e * cap, sent)


def _all_to_all(x, axes):
    return jax.lax.all_to_all(x, axes, 0, 0, tiled=True) if axes else x


def _ragged_body(cfg, lay, limit, gate, up, down, x, weights, indices):
    flat, wts, experts = _flat(x, weights, indices)
    (p, e), (n, d), k = (lay.p, cfg.n_routed_experts), flat.shape, indices.shape[-1]
    n_local, a = e // p, n * k
    me = jax.lax.axis_index(lay.ep) if lay.ep else 0
    order = jnp.argsort(experts, stable=True)
    rows = assignment_rows(flat, k)[order]  # sorted by expert, so each destination shard's rows are contiguous
    counts = jnp.bincount(experts, length=e).astype(jnp.int32)
    all_counts = jax.lax.all_gather(counts, lay.ep) if lay.ep else counts[None]  # [p (source), e]
    pair = all_counts.reshape(p, p, n_local).sum(-1)  # [source, destination] rows
    recv_rows = p * a if cfg.capacity_factor is None else min(p * a, math.ceil(cfg.capacity_factor * a))
    at_dest = jnp.cumsum(pair, 0) - pair  # where each source's rows start in each destination's buffer
    sent = jnp.clip(recv_rows - at_dest, 0, pair)  # rows past the receive buffer are dropped
    at_source = jnp.cumsum(pair, 1) - pair  # where each destination's rows start in the source's sorted rows
    recv = _ragged_exchange(rows, recv_rows, at_source[me], sent[me], at_dest[me], sent[:, me], lay.ep)

    # Each received row's local expert: sources in order, each source's rows sorted by expert and cut at `sent`.
    mine = jax.lax.dynamic_slice_in_dim(all_counts, me * n_local, n_local, axis=1)  # [source, l]
    ends = at_dest[:, me, None] + jnp.minimum(jnp.cumsum(mine, 1), sent[:, me, None])
    segment = jnp.searchsorted(ends.reshape(-1), jnp.arange(recv_rows), side="right")
    row_expert = jnp.where(segment < p * n_local, segment % n_local, n_local)
    # Exact grouped matmul: one expert gets at most one row per token of every source.
    out, _ = grouped(FFN(gate, up, down, limit), recv, row_expert, local_impl(), min(recv_rows, p * n))

    back = _ragged_exchange(out, a, at_dest[:, me], sent[:, me], at_source[:, me], sent[me], lay.ep)
    destination = experts[order] // n_local
    kept_sorted = jnp.arange(a) - at_source[me][destination] < sent[me][destination]
    per_assignment = jnp.zeros_like(back).at[order].set(jnp.where(kept_sorted[:, None], back, 0))
    dropped = jnp.zeros(a, bool).at[order].set(~kept_sorted)
    remote = sent[me].sum() - sent[me, me]
    return _finish(lay, combine(per_assignment, wts), indices.shape, dropped, 2.0 * remote * d * rows.dtype.itemsize)


def _ragged_exchange(operand, out_rows, input_offsets, send_sizes, output_offsets, recv_sizes, axes):
    """`jax.lax.ragged_all_to_all` into a fresh [out_rows, d] buffer, or (backends without it) the same exchange
    as an all_to_all of padded [p, rows, d] chunks plus a scatter: identical result, p x the bytes on the wire."""
    output = jnp.zeros((out_rows, operand.shape[-1]), operand.dtype)
    if not axes:
        idx = output_offsets[0] + jnp.arange(operand.shape[0])
        valid = jnp.arange(operand.shape[0]) < send_sizes[0]
        return output.at[jnp.where(valid, idx, out_rows)].set(operand, mode="drop")
    if ragged_all_to_all_supported(target_platform()):
        return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                                         axis_name=axes)
    m = operand.shape[0]
    span = jnp.arange(m)
    chunks = operand.at[input_offsets[:, None] + span].get(mode="fill", fill_value=0)  # [p, m, d]
    chunks = jnp.where((span < send_sizes[:, None])[..., None], chunks, 0)
    received = _all_to_all(chunks, axes)  # [p (source), m, d]
    starts = _all_to_all(output_offsets, axes)  # where each source's chunk goes in my output
    target = jnp.where(span < recv_sizes[:, None], starts[:, None] + span, out_rows)
    return output.at[target.reshape(-1)].set(received.reshape(-1, operand.shape[-1]), mode="drop")
