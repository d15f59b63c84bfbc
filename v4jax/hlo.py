"""Bytes moved by collectives in compiled XLA HLO, to check an analytic communication cost model against it.

Input is the text of `jax.jit(f).lower(*args).compile().as_text()`: post-optimisation HLO, one instruction a line.
`collectives` finds every all-gather, all-reduce, all-to-all, collective-permute and reduce-scatter in it and
`received_bytes` sums, per participating device, the bytes that device receives from the others. With R the bytes
of the op's result buffer and g the devices in one replica group:

- all-gather:          R * (g-1)/g   (a device already holds its own 1/g of the result)
- all-to-all:          R * (g-1)/g   (likewise its own chunk)
- collective-permute:  R             (a device that is a target receives the whole buffer)
- reduce-scatter:      R * (g-1)     (= operand bytes * (g-1)/g, the operand being g*R)
- all-reduce:          2 * R * (g-1)/g, the ring algorithm: a reduce-scatter then an all-gather. Only this one can
                       be fractional; it is rounded down.

What is counted, and how:

- The count is static: an op is counted once per appearance in the text. An op inside a while-loop body (a
  `fori_loop` or `scan`) appears once however many iterations run; multiply by the trip count yourself.
- Async pairs are counted once, at the start op (`all-gather-start`, `all-reduce-start`, `collective-permute-start`);
  the `-done` op is skipped. `all-reduce-start` returns the reduced buffer itself. `all-gather-start` returns
  `(operand, result)` and `collective-permute-start` `(operand, result, u32[], u32[])` (the trailing context scalars
  vary between XLA versions): the buffer counted is element 1, the gathered / permuted one. Collectives that XLA
  makes async through the generic `async-start(...), calls=%computation` wrapper (GPU all-to-all, reduce-scatter)
  are counted through the plain op inside the called computation, which the text prints once.
- A combined collective (several operands, one op) has a tuple result such as `(f32[4,8], f32[16])`; R is the sum
  of the parts. XLA:CPU also emits all-to-all in this tuple form, one part per peer.
- Replica groups: explicit `{{0,1},{2,3}}` (size of the first group); iota `[2,4]<=[8]` or `[4,2]<=[2,4]T(1,0)`
  (`[groups, group size]`, so the last number of the leading bracket); mesh axes `mesh['a'=4,'b'=2] {'a'}` (the
  product of the named axes' sizes; a sub-axis `'a':(1)2` counts its own size); and empty `{}` or none at all, which
  means every device, `replica_count * num_partitions` from the `HloModule` header. A collective-permute is a set of
  point-to-point transfers: its group size is 2 and `pairs` counts the `source_target_pairs` of the whole program
  (a 3-step shift over a 4-way axis on a mesh with 2 data replicas has 6 pairs).

What the backend emits is what is counted: XLA:CPU, for example, converts bf16 collectives to f32 (a bf16 all-gather
shows up as an f32 one), so on CPU the bytes of a bf16 program's collectives are twice the analytic bf16 figure.
"""

import dataclasses
import math
import re
from collections.abc import Iterable

ITEMSIZE = {
    "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8,
    "c128": 16,
}
OPS = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
_ASYNC_START = {"all-gather-start": "all-gather", "all-reduce-start": "all-reduce",
                "collective-permute-start": "collective-permute"}

_INSTRUCTION = re.compile(r"\s*(?:ROOT\s+)?%?[^\s=]+\s*=\s*")
_OPCODE = re.compile(r"\s*([a-z][a-z0-9-]*)\(")
_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([^\]]*)\](?:\{[^}]*\})?")
_COMMENT = re.compile(r"\s*/\*.*?\*/\s*")
_EXPLICIT_GROUPS = re.compile(r"replica_groups=\{(\{[^}]*\})?")
_IOTA_GROUPS = re.compile(r"replica_groups=\[\d+,(\d+)\]<=")
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\((?:[^()]|\([^()]*\))*\))? \{([^}]*)\}")
_MESH_AXIS = re.compile(r"'?([^'=,\s]+)'?=(\d+)")
_GROUP_AXIS = re.compile(r"'?([^':,\s]+)'?(?::\(\d+\)(\d+))?")
_PAIRS = re.compile(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective op of the HLO text.

    shape: the result shape, e.g. (2, 3, 16); for a tuple result the tuple of its parts' shapes, ((4, 8), (16,)).
    dtype: the HLO element type ("f32", "bf16", ...); for a tuple result with parts of several types, the types in
      order of appearance joined by ",".
    group_size: devices per replica group (2 for a collective-permute).
    pairs: a collective-permute's number of source->target pairs; 0 for other ops.
    received_bytes: bytes one participating device receives for this op (see the module docstring).
    """

    op: str
    shape: tuple
    dtype: str
    group_size: int
    pairs: int
    received_bytes: int


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective of `hlo_text` in order of appearance, async pairs once (at the start op)."""
    parsed = (_parse_instruction(line) for line in hlo_text.splitlines())
    return [_collective(*instruction, hlo_text) for instruction in parsed if instruction is not None]


def received_bytes(hlo_text: str, ops: Iterable[str] | None = None) -> int:
    """Bytes one device receives over all collectives of `hlo_text`, or only those whose op is in `ops`."""
    wanted = set(OPS if ops is None else ops)
    if unknown := wanted - set(OPS):
        raise ValueError(f"received_bytes: unknown collective ops {sorted(unknown)}; known: {OPS}")
    return sum(c.received_bytes for c in collectives(hlo_text) if c.op in wanted)


def _parse_instruction(line: str):
    """(opcode, result type, attribute text) of a collective instruction line, None for any other line."""
    head = _INSTRUCTION.match(line)
    if head is None:
        return None
    result, end = _parse_type(line, head.end())
    opcode = None if result is None else _OPCODE.match(line, end)
    if opcode is None or not (opcode[1] in OPS or opcode[1] in _ASYNC_START):
        return None
    return opcode[1], result, line[opcode.end():]


def _parse_type(text: str, pos: int):
    """Parse an HLO type at text[pos:]: (dtype, dims) for an array, a list of types for a tuple; and the end."""
    if text.startswith("(", pos):
        parts, pos = [], pos + 1
        while not text.startswith(")", pos):
            comment = _COMMENT.match(text, pos)
            part, pos = _parse_type(text, comment.end() if comment else pos)
            if part is None:
                return None, pos
            parts.append(part)
            pos = pos + 2 if text.startswith(", ", pos) else pos
        return parts, pos + 1
    array = _ARRAY.match(text, pos)
    if array is None:
        return None, pos
    dims = tuple(int(d.strip().removeprefix("<=")) for d in array[2].split(",") if d.strip())
    return (array[1], dims), array.end()


def _collective(opcode: str, result, attributes: str, hlo_text: str) -> Collective:
    op = _ASYNC_START.get(opcode, opcode)
    if opcode in ("all-gather-start", "collective-permute-start") and isinstance(result, list):
        result = result[1]
    arrays = list(_flatten(result))
    nbytes = sum(_nbytes(dtype, dims) for dtype, dims in arrays)
    pairs = _pairs(attributes) if op == "collective-permute" else 0
    group = 2 if op == "collective-permute" else _group_size(attributes, hlo_text)
    shape = tuple(dims for _, dims in arrays) if isinstance(result, list) else arrays[0][1]
    dtype = ",".join(dict.fromkeys(dtype for dtype, _ in arrays))
    return Collective(op, shape, dtype, group, pairs, _received(op, nbytes, group))


def _flatten(result):
    if isinstance(result, list):
        for part in result:
            yield from _flatten(part)
    else:
        yield result


def _nbytes(dtype: str, dims: tuple[int, ...]) -> int:
    if dtype not in ITEMSIZE:
        raise ValueError(f"unknown HLO element type {dtype!r} (known: {', '.join(ITEMSIZE)})")
    return math.prod(dims) * ITEMSIZE[dtype]


def _received(op: str, nbytes: int, group: int) -> int:
    if op == "collective-permute":
        return nbytes
    if op == "reduce-scatter":
        return nbytes * (group - 1)
    if op == "all-reduce":
        return 2 * nbytes * (group - 1) // group
    return nbytes * (group - 1) // group


def _pairs(attributes: str) -> int:
    pairs = _PAIRS.search(attributes)
    return pairs[1].count("{") if pairs else 0


def _group_size(attributes: str, hlo_text: str) -> int:
    """Devices per replica group, from whichever replica_groups form the attributes use."""
    if iota := _IOTA_GROUPS.search(attributes):
        return int(iota[1])
    if mesh := _MESH_GROUPS.search(attributes):
        sizes = {name: int(size) for name, size in _MESH_AXIS.findall(mesh[1])}
        return math.prod(int(sub) if sub else sizes[name] for name, sub in _GROUP_AXIS.findall(mesh[2]))
    explicit = _EXPLICIT_GROUPS.search(attributes)
    if explicit and explicit[1]:
        return explicit[1].count(",") + 1
    return _module_devices(hlo_text)


def _module_devices(hlo_text: str) -> int:
    """replica_count * num_partitions of the HloModule header (XLA leaves out either when it is 1)."""
    header = re.search(r"^HloModule .*$", hlo_text, re.MULTILINE)
    if header is None:
        raise ValueError("HLO text has no HloModule header, so empty replica_groups cannot be sized")
    counts = [re.search(rf"\b{key}=(\d+)", header[0]) for key in ("replica_count", "num_partitions")]
    return math.prod(int(c[1]) for c in counts if c)
