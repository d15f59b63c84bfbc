"""v4jax.hlo: collectives and their received bytes, from real XLA:CPU output and from hand-written HLO lines."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from v4jax import hlo
from v4jax.sharding import make_mesh

F32 = 4


def compiled_text(fn, mesh, in_specs, out_specs, *args) -> str:
    """Post-optimisation HLO of shard_map(fn) (check_vma off: gathered outputs are declared replicated)."""
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    return jax.jit(mapped).lower(*args).compile().as_text()


def module(*lines: str, header: str = "HloModule m, num_partitions=8") -> str:
    return "\n".join([header, "ENTRY %main {", *(f"  {line}" for line in lines), "}"])


def test_ppermute_over_a_4_way_axis():
    mesh = make_mesh(context=4)
    shift = [(i, i + 1) for i in range(3)]
    text = compiled_text(lambda x: jax.lax.ppermute(x, "context", shift), mesh, P(None, "context"), P(None, "context"),
                         jnp.zeros((2, 12, 16)))
    assert hlo.collectives(text) == [hlo.Collective("collective-permute", (2, 3, 16), "f32", group_size=2, pairs=3,
                                                    received_bytes=2 * 3 * 16 * F32)]


def test_ppermute_pairs_cover_every_replica_of_the_axis():
    mesh = make_mesh(data=2, context=4)
    shift = [(i, i + 1) for i in range(3)]
    text = compiled_text(lambda x: jax.lax.ppermute(x, "context", shift), mesh, P("data", "context"),
                         P("data", "context"), jnp.zeros((4, 12, 16)))
    [permute] = hlo.collectives(text)
    assert (permute.pairs, permute.received_bytes) == (6, 2 * 3 * 16 * F32)


def test_tiled_all_gather():
    mesh = make_mesh(data=2, context=4)
    text = compiled_text(lambda x: jax.lax.all_gather(x, "context", axis=1, tiled=True), mesh, P("data", "context"),
                         P("data"), jnp.zeros((4, 32, 4)))
    [gather] = hlo.collectives(text)
    assert (gather.op, gather.shape, gather.group_size) == ("all-gather", (2, 32, 4), 4)
    assert gather.received_bytes == 3 * 2 * 8 * 4 * F32


def test_psum_over_2_devices():
    mesh = make_mesh(data=2, context=4)
    text = compiled_text(lambda x: jax.lax.psum(x, "data"), mesh, P("data", "context"), P(None, "context"),
                         jnp.zeros((4, 12, 16)))
    [reduce] = hlo.collectives(text)
    assert (reduce.op, reduce.shape, reduce.group_size) == ("all-reduce", (2, 3, 16), 2)
    assert reduce.received_bytes == 2 * (2 * 3 * 16 * F32) * 1 // 2


def test_all_to_all_is_a_tuple_of_chunks_on_cpu():
    mesh = make_mesh(data=2, context=4)
    text = compiled_text(lambda x: jax.lax.all_to_all(x, "context", 0, 1, tiled=True), mesh, P("data", "context"),
                         P("data", "context"), jnp.zeros((8, 16, 4)))
    [a2a] = hlo.collectives(text)
    assert (a2a.op, a2a.group_size) == ("all-to-all", 4)
    assert a2a.received_bytes == 4 * 4 * 4 * F32 * 3 // 4  # local block [4, 4, 4]: all but its own quarter


def test_psum_scatter():
    mesh = make_mesh(data=2, context=4)
    text = compiled_text(lambda x: jax.lax.psum_scatter(x, "context", scatter_dimension=1, tiled=True), mesh,
                         P("data"), P("data", "context"), jnp.zeros((4, 16, 4)))
    [scatter] = hlo.collectives(text)
    assert (scatter.op, scatter.shape) == ("reduce-scatter", (2, 4, 4))
    assert scatter.received_bytes == 2 * 4 * 4 * F32 * 3


def test_bf16_all_gather_counts_what_the_backend_moves():
    mesh = make_mesh(context=4)
    text = compiled_text(lambda x: jax.lax.all_gather(x, "context", axis=0, tiled=True), mesh, P("context"), P(),
                         jnp.zeros((8, 16), jnp.bfloat16))
    [gather] = hlo.collectives(text)
    # XLA:CPU converts bf16 collectives to f32; an accelerator moves bf16.
    dtype, itemsize = ("f32", 4) if jax.default_backend() == "cpu" else ("bf16", 2)
    assert (gather.dtype, gather.received_bytes) == (dtype, 3 * 2 * 16 * itemsize)
    line = "%ag = bf16[8,16]{1,0} all-gather(%p), channel_id=1, replica_groups={{0,1,2,3}}, dimensions={0}"
    assert hlo.received_bytes(module(line)) == 3 * 2 * 16 * 2


def test_two_collectives_summed_and_filtered():
    mesh = make_mesh(context=4)

    def fn(x):
        shifted = jax.lax.ppermute(x, "context", [(i, (i + 1) % 4) for i in range(4)])
        return jax.lax.all_gather(shifted * 2, "context", axis=0, tiled=True)

    text = compiled_text(fn, mesh, P("context"), P(), jnp.zeros((8, 16)))
    permute, gather = 2 * 16 * F32, 3 * 2 * 16 * F32
    assert sorted(c.op for c in hlo.collectives(text)) == ["all-gather", "collective-permute"]
    assert hlo.received_bytes(text) == permute + gather
    assert hlo.received_bytes(text, ops=["all-gather"]) == gather
    assert hlo.received_bytes(text, ops=("collective-permute", "all-reduce")) == permute


def test_a_loop_body_is_counted_once():
    mesh = make_mesh(context=4)
    ring = [(i, (i + 1) % 4) for i in range(4)]

    def fn(x):
        return jax.lax.fori_loop(0, 3, lambda _, c: jnp.sin(jax.lax.ppermute(c, "context", ring)), x)

    text = compiled_text(fn, mesh, P("context"), P("context"), jnp.zeros((8, 16)))
    assert hlo.received_bytes(text) == 2 * 16 * F32


@pytest.mark.parametrize("groups, size", [
    ("replica_groups=[2,4]<=[8]", 4),
    ("replica_groups=[4,2]<=[2,4]T(1,0)", 2),
    ("replica_groups={{0,4},{1,5},{2,6},{3,7}}", 2),
    ("replica_groups=mesh['axis_0'=4,'axis_1'=2,'axis_2'=1], device_ids=([2,4]T(1,0)) {'axis_0'}", 4),
    ("replica_groups=mesh['a'=2,'b'=4] {'a','b'}", 8),
    ("replica_groups=mesh['a'=8] {'a':(1)2}", 2),
    ("replica_groups={}", 8),
    ("use_global_device_ids=true", 8),
])
def test_replica_group_forms(groups, size):
    line = f"%ar = f32[4,8]{{1,0}} all-reduce(%p), channel_id=1, {groups}, to_apply=%add"
    [reduce] = hlo.collectives(module(line))
    assert reduce.group_size == size
    assert reduce.received_bytes == 2 * 4 * 8 * F32 * (size - 1) // size


def test_empty_groups_need_the_module_header():
    with pytest.raises(ValueError, match="HloModule header"):
        hlo.collectives("%ar = f32[4] all-reduce(%p), replica_groups={}, to_apply=%add")
    [reduce] = hlo.collectives(module("%ar = f32[4] all-reduce(%p), replica_groups={}", header="HloModule m"))
    assert reduce.group_size == 1  # XLA leaves replica_count=1 and num_partitions=1 out of the header


def test_combined_collective_sums_its_tuple_parts():
    line = ("ROOT %all-reduce = (f32[4,8]{1,0}, f32[16]{0}) all-reduce(%a, %b), channel_id=1, "
            "replica_groups={{0,1},{2,3},{4,5},{6,7}}, use_global_device_ids=true, to_apply=%add")
    [reduce] = hlo.collectives(module(line))
    assert (reduce.shape, reduce.dtype) == (((4, 8), (16,)), "f32")
    assert reduce.received_bytes == 2 * (32 + 16) * F32 // 2


def test_tuple_type_with_index_comments_and_mixed_types():
    parts = ", ".join(["s8[1,8,2]{2,1,0}"] * 5 + ["/*index=5*/s8[1,8,2]{2,1,0}"] + ["s8[1,8,2]{2,1,0}"] * 2)
    [a2a] = hlo.collectives(module(f"%a2a = ({parts}) all-to-all(%x), replica_groups={{{{0,1,2,3,4,5,6,7}}}}"))
    assert len(a2a.shape) == 8 and a2a.received_bytes == 8 * 16 * 7 // 8
    [gather] = hlo.collectives(module("%ag = (f32[8]{0}, bf16[8]{0}) all-gather(%a, %b), replica_groups={{0,1}}"))
    assert (gather.dtype, gather.received_bytes) == ("f32,bf16", (32 + 16) // 2)


def test_async_pairs_count_the_start_op_once():
    text = module(
        "%ag-start = (f32[2,8]{1,0}, f32[8,8]{1,0}) all-gather-start(f32[2,8]{1,0} %p), channel_id=1, "
        "replica_groups={{0,1,2,3}}, dimensions={0}, use_global_device_ids=true",
        "%ag-done = f32[8,8]{1,0} all-gather-done((f32[2,8]{1,0}, f32[8,8]{1,0}) %ag-start)",
        "%cp-start = (f32[4,4]{1,0}, f32[4,4]{1,0}, u32[], u32[]) collective-permute-start(%x), channel_id=2, "
        "source_target_pairs={{0,1},{1,2},{2,3},{3,0}}",
        "%cp-done = f32[4,4]{1,0} collective-permute-done(%cp-start)",
        "%ar-start = f32[16]{0} all-reduce-start(%y), replica_groups={{0,1}}, to_apply=%add",
        "%ar-done = f32[16]{0} all-reduce-done(%ar-start)",
        "%ags = ((f32[1]{0}, f32[2]{0}), (f32[4]{0}, f32[8]{0})) all-gather-start(%a, %b), replica_groups={{0,1,2,3}}",
    )
    found = hlo.collectives(text)
    assert [(c.op, c.shape) for c in found] == [
        ("all-gather", (8, 8)), ("collective-permute", (4, 4)), ("all-reduce", (16,)),
        ("all-gather", ((4,), (8,)))]
    assert [c.received_bytes for c in found] == [8 * 8 * F32 * 3 // 4, 16 * F32, 16 * F32, 12 * F32 * 3 // 4]
    assert found[1].pairs == 4


def test_async_wrapper_counts_the_called_op():
    text = """HloModule m, num_partitions=2
%async_computation (p: bf16[4,2]) -> bf16[4,2] {
  %p = bf16[4,2]{1,0} parameter(0)
  ROOT %a2a = bf16[4,2]{1,0} all-to-all(%p), replica_groups={{0,1}}, dimensions={0}
}
ENTRY %main (x: bf16[4,2]) -> bf16[4,2] {
  %x = bf16[4,2]{1,0} parameter(0)
  %a2a-start = ((bf16[4,2]{1,0}), bf16[4,2]{1,0}) async-start(%x), calls=%async_computation
  ROOT %a2a-done = bf16[4,2]{1,0} async-done(%a2a-start)
}"""
    assert [(c.op, c.received_bytes) for c in hlo.collectives(text)] == [("all-to-all", 8 * 2 // 2)]


def test_non_collective_lines_are_ignored():
    text = module(
        "%p = f32[4]{0} parameter(0), metadata={op_name=\"jit(f)/all-gather\"}",
        "%psum_start.3 = f32[4]{0} add(%p, %p)",
        "%wrapped = f32[4]{0} fusion(%p), kind=kLoop, calls=%all-reduce.clone",
    )
    assert hlo.collectives(text) == []


@pytest.mark.parametrize("dtype, itemsize", [
    ("pred", 1), ("s8", 1), ("u8", 1), ("s32", 4), ("u32", 4), ("s64", 8), ("f16", 2), ("bf16", 2), ("f32", 4),
    ("f64", 8),
])
def test_element_types(dtype, itemsize):
    line = f"%cp = {dtype}[3,5]{{1,0}} collective-permute(%p), source_target_pairs={{{{0,1}}}}"
    assert hlo.received_bytes(module(line)) == 15 * itemsize


def test_unknown_element_type_and_op_are_errors():
    with pytest.raises(ValueError, match="'s4'"):
        hlo.collectives(module("%cp = s4[8]{0} collective-permute(%p), source_target_pairs={{0,1}}"))
    with pytest.raises(ValueError, match="all-gather-start"):
        hlo.received_bytes(module(), ops=["all-gather-start"])
