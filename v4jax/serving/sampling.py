"""Batched token sampling: greedy, temperature, top-k, top-p, one PRNG stream per request.

Legend: b batch (decode slots), v vocab.

Every row carries its own sampling settings as arrays, so one compiled `sample` serves any mix of greedy and
sampled requests. A row's randomness is `fold_in(key(seed), step)`, where `step` counts the tokens that request has
generated before this one: a request's tokens depend only on its seed and its own logits, never on which slot it
runs in or on what the other slots are doing, so a seeded request is reproducible under continuous batching.

Order of the filters (as in Hugging Face and vLLM): logits / temperature, then top-k (keep the k most likely),
then top-p on the renormalised survivors (keep the smallest set of most likely tokens whose mass reaches p).
Temperature 0 is greedy (argmax of the raw logits); top-k 0 and top-p 1 switch those filters off.

No row sorts the vocabulary: a top-k of at most `TOP_K_SHORT_LIST` filters a `lax.top_k` list, other filters find
their cut-off value by bisection (`threshold_filter`), and a token is drawn by inverting the running sum of the kept
probabilities with one uniform per row (`draw`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

SEED_MODULUS = 1 << 32  # seeds are taken modulo 2**32 (a uint32 key seed)
MIN_TEMPERATURE = 1e-6  # smaller positive temperatures divide by this (keeps logits / T finite; still argmax-like)
TOP_K_SHORT_LIST = 1024  # rows with 0 < top_k <= this draw from a `lax.top_k` list of this many
# Rows sampled at a time. XLA:CPU maps a program's temporaries afresh on each call once they pass glibc's 32 MiB
# mmap threshold, and pays a page fault per 4 KiB: 16 rows of a 129K vocabulary took 9 ms where 8 took 0.7.
SAMPLE_BLOCK = 8


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops.

    temperature: 0 is greedy; otherwise logits are divided by it before top-k / top-p.
    top_k: keep only the k most likely tokens (0: all). top_p: nucleus mass in (0, 1] (1: all).
    seed: the request's PRNG seed (any int, taken modulo 2**32).
    max_tokens: generate at most this many tokens (>= 1).
    stop_tokens: token ids that end the request; the stop token itself is not part of the output.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    max_tokens: int = 32
    stop_tokens: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "stop_tokens", tuple(int(t) for t in self.stop_tokens))
        self.validate()

    def validate(self, vocab_size: int | None = None) -> None:
        """ValueError naming the field for values outside their range."""
        if not _is_number(self.temperature) or not np.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0: off), got {self.top_k!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        bad = [t for t in self.stop_tokens if t < 0 or (vocab_size is not None and t >= vocab_size)]
        if bad:
            raise ValueError(f"stop token ids must be in [0, {vocab_size or 'vocab'}), got {bad}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


@dataclasses.dataclass
class BatchParams:
    """Per-row sampling settings as host arrays (the arguments `sample` takes after the logits)."""

    seeds: np.ndarray  # uint32 [b]
    steps: np.ndarray  # int32 [b]: tokens this row's request generated so far (the fold-in index)
    temperature: np.ndarray  # float32 [b]
    top_k: np.ndarray  # int32 [b]
    top_p: np.ndarray  # float32 [b]

    @classmethod
    def empty(cls, batch: int) -> BatchParams:
        return cls(seeds=np.zeros(batch, np.uint32), steps=np.zeros(batch, np.int32),
                   temperature=np.zeros(batch, np.float32), top_k=np.zeros(batch, np.int32),
                   top_p=np.ones(batch, np.float32))

    @classmethod
    def of(cls, params: Sequence[SamplingParams], steps: Sequence[int] | None = None) -> BatchParams:
        out = cls.empty(len(params))
        for row, p in enumerate(params):
            out.set_row(row, p, 0 if steps is None else steps[row])
        return out

    def set_row(self, row: int, params: SamplingParams, step: int = 0) -> None:
        self.seeds[row] = params.seed % SEED_MODULUS
        self.steps[row] = step
        self.temperature[row] = params.temperature
        self.top_k[row] = params.top_k
        self.top_p[row] = params.top_p

    def arrays(self) -> tuple[np.ndarray, ...]:
        return self.seeds, self.steps, self.temperature, self.top_k, self.top_p


def _top_candidates(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array):
    """For rows with 0 < top_k <= `TOP_K_SHORT_LIST`: the that-many most likely entries (`lax.top_k`, most likely
    first, ties by id) / temperature, the filtered ones at -inf, and their vocab ids. Exact: top-k drops the rest
    anyway, and top-p works on what top-k leaves."""
    values, order = jax.lax.top_k(logits.astype(jnp.float32), min(TOP_K_SHORT_LIST, logits.shape[-1]))
    scaled = values / jnp.maximum(temperature, MIN_TEMPERATURE)[:, None]
    rank = jnp.arange(values.shape[-1])[None, :]
    scaled = jnp.where((top_k[:, None] <= 0) | (rank < top_k[:, None]), scaled, -jnp.inf)
    probs = jax.nn.softmax(scaled, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
    keep_p = (top_p[:, None] >= 1) | (mass_before < top_p[:, None]) | (rank == 0)
    return jnp.where(keep_p, scaled, -jnp.inf), order


def _unfiltered(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array):
    """For rows with neither filter (top_k 0, top_p 1): logits / temperature in vocabulary order, no sort."""
    return logits.astype(jnp.float32) / jnp.maximum(temperature, MIN_TEMPERATURE)[:, None], None


# Filtering by thresholds, without a sort. Both filters keep a prefix of the vocabulary ordered most likely first,
# ties by id: every token above some value t, and the first few (in id order) of the tokens at t. t is found by
# bisection over the 2**32 float32 values, 32 fixed passes over the row, and is exact, as a sort is.

def _ordered_keys(x: jax.Array) -> jax.Array:
    """float32 -> uint32 in the same order (-0.0 as +0.0; NaN aside): each bisection step compares integers."""
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _largest(lo: jax.Array, hi: jax.Array, holds, steps: int) -> jax.Array:
    """Per row, the largest x in [lo, hi] (int [b]) at which holds(x) ([b] -> bool [b]) is true, given that it is
    true at lo and, once false, stays false as x grows; `steps` halvings must cover hi - lo."""
    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2 + (hi - lo) % 2  # the upper middle, without overflow
        ok = holds(mid) | (lo == hi)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    return jax.lax.fori_loop(0, steps, halve, (lo, hi))[0]


def _prefix(keys: jax.Array, allowed: jax.Array, enough, ties_wanted) -> jax.Array:
    """bool [b, v]: the allowed tokens above the threshold t (the largest key with enough(keys >= t)) and the first
    ties_wanted(above, tie) ([b] int, >= 1) of the allowed tokens at t, in id order."""
    threshold = _largest(keys.min(-1), keys.max(-1), lambda t: enough(keys >= t[:, None]), 32)[:, None]
    above = allowed & (keys > threshold)
    tie = allowed & (keys == threshold)
    wanted = ties_wanted(above, tie)

    def first_ties(_):  # the largest id j with fewer than `wanted` ties before it: keep the ties up to j
        ids = jnp.arange(keys.shape[-1], dtype=jnp.int32)
        fewer = lambda j: jnp.sum(tie & (ids < j[:, None]), axis=-1) < wanted
        last = _largest(jnp.zeros_like(wanted), jnp.full_like(wanted, keys.shape[-1] - 1), fewer,
                        keys.shape[-1].bit_length())
        return tie & (ids <= last[:, None])

    # More tied tokens at t than wanted is rare (equal logits): bisect over ids only then.
    tie = jax.lax.cond(jnp.any(tie.sum(-1) > wanted), first_ties, lambda _: tie, None)
    return above | tie


def threshold_filter(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """float [b, v] logits -> float32 [b, v] logits / temperature in vocabulary order, the entries that top-k
    (top_k > 0) and then top-p (top_p < 1, on top-k's renormalised survivors) drop at -inf: the tokens a stable
    sort, most likely first, would keep. About 35 passes over [b, v] where a vocabulary sort takes ~25x longer."""
    logits = logits.astype(jnp.float32)
    keys = _ordered_keys(logits)  # from the raw logits: dividing by a temperature may merge close values
    everything = jnp.ones(keys.shape, bool)
    cut_k = (top_k > 0) & (top_k < keys.shape[-1])

    def top_k_keep(_):
        kept = _prefix(keys, everything, lambda at_least: at_least.sum(-1) >= top_k,
                       lambda above, _: top_k - above.sum(-1))
        return kept | ~cut_k[:, None]

    allowed = jax.lax.cond(jnp.any(cut_k), top_k_keep, lambda _: everything, None)
    scaled = lambda: jnp.where(allowed, logits / jnp.maximum(temperature, MIN_TEMPERATURE)[:, None], -jnp.inf)
    cut_p = top_p < 1

    def top_p_keep(_):
        probs = jax.nn.softmax(scaled(), axis=-1)  # 0 where top-k dropped
        mass = lambda where: jnp.sum(jnp.where(where, probs, 0.0), axis=-1)

        def ties_wanted(above, tie):  # tied tokens share one probability: how many more reach p
            share = jnp.max(jnp.where(tie, probs, 0.0), axis=-1)
            wanted = jnp.ceil((top_p - mass(above)) / share)
            return jnp.clip(jnp.nan_to_num(wanted, nan=1.0), 1, keys.shape[-1]).astype(jnp.int32)

        return _prefix(keys, allowed, lambda at_least: mass(at_least) >= top_p, ties_wanted) | ~cut_p[:, None]

    keep = jax.lax.cond(jnp.any(cut_p), top_p_keep, lambda _: allowed, None)
    return jnp.where(keep, scaled(), -jnp.inf)


def _thresholded(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array):
    return threshold_filter(logits, temperature, top_k, top_p), None


def draw(keys: jax.Array, scaled: jax.Array) -> jax.Array:
    """int32 [b]: one index per row of float32 [b, n] logits (-inf: never), drawn with the row's key by inverting
    the running sum of exp(scaled): a single uniform per row where the Gumbel-max trick needs n of them (4x
    slower on a vocabulary-sized row on CPU, twice the memory)."""
    weights = jnp.exp(scaled - jnp.max(scaled, axis=-1, keepdims=True))
    running = jnp.cumsum(weights, axis=-1)
    total = running[:, -1:]
    share = jax.vmap(lambda key: jax.random.uniform(key, dtype=jnp.float32))(keys)[:, None] * total
    share = jnp.minimum(share, jnp.nextafter(total, 0))  # below the total, whatever the rounding
    index = jnp.arange(scaled.shape[-1], dtype=jnp.int32)
    first = jnp.min(jnp.where((running > share) & (weights > 0), index, scaled.shape[-1]), axis=-1)
    return jnp.where(first < scaled.shape[-1], first, greedy(scaled))  # no such entry: only from rounding


def row_keys(seeds: jax.Array, steps: jax.Array) -> jax.Array:
    """One typed PRNG key per row: fold_in(key(seed), step)."""
    return jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seeds.astype(jnp.uint32), steps)


def greedy(logits: jax.Array) -> jax.Array:
    """int32 [...] index of the largest of float [..., v] logits, the first on ties, a NaN if any (as
    `jnp.argmax`). Two plain reductions (max, then the least index holding it) instead of argmax's (value, index)
    pair reduction, which XLA:CPU runs ~4x slower on a vocabulary-sized row: greedy decoding does one per token."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    hit = (logits == top) | jnp.isnan(logits)
    index = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(hit, index, logits.shape[-1]), axis=-1)


def sample(logits: jax.Array, seeds: jax.Array, steps: jax.Array, temperature: jax.Array, top_k: jax.Array,
           top_p: jax.Array) -> jax.Array:
    """int32 [b] next tokens from float [b, v] logits; traceable (call inside a jit) or eager.

    Rows with temperature 0 take the argmax of the raw logits; the others draw from the filtered distribution
    with their own key `fold_in(key(seeds[i]), steps[i])`. More than `SAMPLE_BLOCK` rows are sampled a block at a
    time (the last block may overlap the one before: each row's token depends on that row alone).
    """
    rows = (jnp.asarray(logits), jnp.asarray(seeds), jnp.asarray(steps, jnp.int32),
            jnp.asarray(temperature, jnp.float32), jnp.asarray(top_k, jnp.int32), jnp.asarray(top_p, jnp.float32))
    b = rows[0].shape[0]
    if b <= SAMPLE_BLOCK:
        return _sample_block(*rows)

    def block(tokens, start):
        sliced = (jax.lax.dynamic_slice_in_dim(a, start, SAMPLE_BLOCK) for a in rows)
        return jax.lax.dynamic_update_slice_in_dim(tokens, _sample_block(*sliced), start, 0), None

    starts = jnp.minimum(jnp.arange(0, b, SAMPLE_BLOCK), b - SAMPLE_BLOCK)
    return jax.lax.scan(block, jnp.zeros(b, jnp.int32), starts)[0]


def _sample_block(logits, seeds, steps, temperature, top_k, top_p) -> jax.Array:
    keys = row_keys(seeds, steps)
    greedy_tokens = greedy(logits)
    sampled = temperature > 0
    plain = sampled & (top_k <= 0) & (top_p >= 1)
    short = sampled & (top_k > 0) & (top_k <= TOP_K_SHORT_LIST)
    thresholds = sampled & ~plain & ~short  # top-p without top-k, or top-k over the short list

    def way(candidates):
        def run(_):
            scaled, order = candidates(logits, temperature, top_k, top_p)
            drawn = draw(keys, scaled)  # an index into `order`, or the vocab id itself where there is none
            return drawn if order is None else jnp.take_along_axis(order, drawn[:, None], axis=-1)[:, 0]
        return run

    # Each way runs only when some row needs it (a short top-k list is the cheapest filter; the thresholds cost
    # ~35 passes over the row). Which way a row takes depends on its own settings only, so its tokens do not depend
    # on its batch-mates.
    tokens = greedy_tokens
    for rows, candidates in ((plain, _unfiltered), (short, _top_candidates), (thresholds, _thresholded)):
        drawn = jax.lax.cond(jnp.any(rows), way(candidates), lambda _: greedy_tokens, None)
        tokens = jnp.where(rows, drawn, tokens)
    return tokens.astype(jnp.int32)


sample_jit = jax.jit(sample)
greedy_jit = jax.jit(greedy)


__all__ = ["BatchParams", "SamplingParams", "draw", "greedy", "greedy_jit", "row_keys", "sample",
           "sample_jit", "threshold_filter"]
