"""Sharding: the five-axis mesh, logical -> mesh resolution, presets on real parameter trees, sharded init."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from v4jax import config, model, sharding
from v4jax.sharding import Axis, constrain, logical_to_spec, make_mesh, state_shardings

AXES = ("data", "fsdp", "context", "expert", "tensor")


def dims(spec: P, ndim: int) -> tuple:
    """A PartitionSpec as a tuple of exactly `ndim` entries (trailing Nones made explicit)."""
    entries = tuple(spec)
    assert len(entries) <= ndim
    return entries + (None,) * (ndim - len(entries))


def mesh_axes_of(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


# ---------------------------------------------------------------------------------------------------------------
# mesh


def test_make_mesh_defaults():
    mesh = make_mesh()
    assert mesh.axis_names == AXES
    assert dict(mesh.shape) == dict.fromkeys(AXES, 1)
    assert mesh.axis_types == (AxisType.Auto,) * 5
    assert mesh.size == 1
    assert tuple(sharding.MESH_AXES) == AXES


def test_make_mesh_sizes():
    mesh = make_mesh(data=2, expert=2, tensor=2)
    assert mesh.axis_names == AXES
    assert dict(mesh.shape) == dict(data=2, fsdp=1, context=1, expert=2, tensor=2)
    assert mesh.axis_types == (AxisType.Auto,) * 5
    assert set(mesh.devices.flat) == set(jax.devices())
    assert make_mesh(context=4).devices.size == 4  # uses the first devices only


@pytest.mark.parametrize("sizes", [dict(data=0), dict(tensor=-1), dict(expert=1.5), dict(fsdp="2")])
def test_make_mesh_rejects_bad_sizes(sizes):
    name = next(iter(sizes))
    with pytest.raises(ValueError, match=name):
        make_mesh(**sizes)


@pytest.mark.parametrize("sizes", [dict(data=16), dict(data=2, fsdp=2, expert=2, tensor=2), dict(context=3, tensor=3)])
def test_make_mesh_rejects_too_many_devices(sizes):
    with pytest.raises(ValueError, match="devices"):
        make_mesh(**sizes)


def test_make_mesh_explicit_devices():
    devices = jax.devices()[4:]
    mesh = make_mesh(expert=2, tensor=2, devices=devices)
    assert set(mesh.devices.flat) == set(devices)
    with pytest.raises(ValueError, match="devices"):
        make_mesh(data=8, devices=devices)


# ---------------------------------------------------------------------------------------------------------------
# logical -> mesh axes


def test_activation_first_come():
    rules = sharding.get_rules("train")
    # batch takes data, fsdp and expert; embed wants fsdp, already taken, so stays whole (no error).
    assert logical_to_spec(("batch", "seq", "embed"), rules) == P(("data", "fsdp", "expert"), None, None)
    full = dict(data=2, fsdp=2, context=1, expert=2, tensor=1)
    assert logical_to_spec(("batch", "seq", "embed"), rules, mesh_shape=full) == P(("data", "fsdp", "expert"), None,
                                                                                  None)
    # Size-1 mesh axes shard nothing and are dropped.
    small = dict(data=2, fsdp=1, context=1, expert=1, tensor=2)
    assert logical_to_spec(("batch", "seq", "embed"), rules, mesh_shape=small) == P("data", None, None)
    assert logical_to_spec(("batch", "seq", "heads", "head_dim"), rules, mesh_shape=small) == P("data", None,
                                                                                               "tensor", None)
    # With batch over (data, expert) only, embed gets fsdp.
    only_data = dict(data=2, fsdp=2, context=1, expert=1, tensor=1)
    assert logical_to_spec(("embed", "batch"), rules, mesh_shape=only_data) == P("fsdp", "data")


def test_long_preset_shards_sequence_on_context():
    rules = sharding.get_rules("long")
    assert logical_to_spec(("batch", "seq", "embed"), rules) == P(("data", "fsdp", "expert"), "context", None)
    assert logical_to_spec(("batch", "seq", "embed"), sharding.get_rules("train")) == P(
        ("data", "fsdp", "expert"), None, None)


def test_serve_preset_has_no_fsdp():
    rules = sharding.get_rules("serve")
    assert logical_to_spec(("experts", "embed", "expert_mlp"), rules, strict=True) == P("expert", None, None)
    assert logical_to_spec(("batch", "seq", "embed"), rules) == P("data", None, None)
    assert all("fsdp" not in axes for axes in rules.values())


def test_strict_collision_for_custom_rules():
    rules = {"embed": ("tensor",), "mlp": ("tensor",)}
    assert logical_to_spec(("embed", "mlp"), rules) == P("tensor", None)  # first come, no error
    with pytest.raises(ValueError, match="collision") as info:
        logical_to_spec(("embed", "mlp"), rules, strict=True)
    message = str(info.value)
    assert "'tensor'" in message and "'embed'" in message and "'mlp'" in message


def test_strict_collision_in_state_shardings():
    abstract = model.abstract(config.preset("tiny-v3"))
    mesh = make_mesh(data=2, expert=2, tensor=2)
    bad = {"experts": ("expert",), "expert_mlp": ("expert",)}  # shards two dims of the expert weights on 'expert'
    with pytest.raises(ValueError, match="collision.*'expert'"):
        state_shardings(abstract, mesh, bad)


def test_unknown_names_rejected():
    with pytest.raises(ValueError, match="unknown logical axis 'bacth'"):
        logical_to_spec(("bacth", "seq"))
    with pytest.raises(ValueError, match="unknown logical axis"):
        sharding.get_rules({"bacth": ("data",)})
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.get_rules({"batch": ("dp",)})
    with pytest.raises(ValueError, match="twice"):
        sharding.get_rules({"batch": ("data", "data")})
    with pytest.raises(ValueError, match="unknown sharding rules preset"):
        sharding.get_rules("trian")


def test_use_rules_scopes_the_default():
    assert sharding.get_rules() is sharding.PRESETS["train"]
    with sharding.use_rules("serve") as rules:
        assert rules is sharding.PRESETS["serve"]
        assert logical_to_spec(("batch", "embed")) == P("data", None)
    assert logical_to_spec(("batch", "embed")) == P(("data", "fsdp", "expert"), None)


# ---------------------------------------------------------------------------------------------------------------
# every parameter resolves under every preset


MESHES = [dict(data=2, expert=2, tensor=2), dict(fsdp=2, expert=2, tensor=2), dict(fsdp=2, context=2, expert=2)]


@pytest.fixture(scope="module")
def abstracts():
    return {name: model.abstract(config.preset(name)) for name in ("tiny-v3", "tiny-hybrid")}


@pytest.mark.parametrize("name", ["tiny-v3", "tiny-hybrid"])
@pytest.mark.parametrize("preset_name", list(sharding.PRESETS))
@pytest.mark.parametrize("sizes", MESHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_every_parameter_resolves(abstracts, name, preset_name, sizes):
    mesh = make_mesh(**sizes)
    abstract = abstracts[name]
    shardings = state_shardings(abstract, mesh, preset_name)
    rules = sharding.PRESETS[preset_name]
    flat_abstract = dict(nnx.to_flat_state(abstract))
    flat = nnx.to_flat_state(shardings)
    assert len(flat) == len(flat_abstract) > 50
    used = set()
    for path, variable in flat:
        named = variable.get_value()
        assert isinstance(named, NamedSharding) and named.mesh == mesh, path
        shape = flat_abstract[path].shape
        logical = sharding.variable_axes(flat_abstract[path])
        assert len(logical) == len(shape), path
        spec = dims(named.spec, len(shape))
        seen = []
        declared_fsdp = any("fsdp" in rules.get(axis, ()) for axis in logical if axis)
        for size, entry, axis in zip(shape, spec, logical):
            axes = mesh_axes_of(entry)
            if axes == ("fsdp",) and "fsdp" not in rules.get(axis, ()):
                # fsdp_fallback: only a parameter none of whose axes the rules put on fsdp, never the layers axis
                assert not declared_fsdp and axis != "layers" and any("fsdp" in v for v in rules.values()), path
                axes = ()
            # Only axes the rules give that logical name, only mesh axes bigger than 1, each at most once.
            assert set(axes) <= set(rules.get(axis, ())) if axis else not axes, (path, spec)
            assert all(mesh.shape[a] > 1 for a in axes), (path, spec)
            seen.extend(axes)
            assert size % int(np.prod([mesh.shape[a] for a in axes])) == 0, (path, shape, spec)
        assert len(seen) == len(set(seen)), (path, spec)
        used.update(seen)
    # The expert weights are always split on 'expert' (every preset maps experts there).
    assert "expert" in used


# ---------------------------------------------------------------------------------------------------------------
# sharded init


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(data=2, expert=2, tensor=2)


@pytest.fixture(scope="module")
def sharded_v3(mesh):
    cfg = config.preset("tiny-v3")
    return cfg, model.init(cfg, jax.random.key(0), mesh=mesh)


def flat_values(state):
    return {path: v.get_value() for path, v in nnx.to_flat_state(state)}


def test_init_on_mesh_places_parameters_by_the_rules(sharded_v3, mesh):
    cfg, params = sharded_v3
    values = flat_values(params)
    expected = {path: v.get_value().spec for path, v in nnx.to_flat_state(state_shardings(model.abstract(cfg), mesh))}
    assert values.keys() == expected.keys()
    for path, array in values.items():
        assert isinstance(array.sharding, NamedSharding) and array.sharding.mesh == mesh, path
        assert dims(array.sharding.spec, array.ndim) == dims(expected[path], array.ndim), path

    def spec(*path):
        array = values[path]
        return dims(array.sharding.spec, array.ndim)

    # Stacked expert weights [layers, experts, embed, expert_mlp]: experts on 'expert'.
    assert spec("unit", "blocks", 0, "mlp", "experts", "gate") == (None, "expert", None, None)
    assert spec("unit", "blocks", 0, "mlp", "experts", "down") == (None, "expert", None, None)
    # wq_b [q_lora, heads, head_dim]: heads on 'tensor' (and [layers, ...] when stacked).
    assert spec("prefix", 0, "attn", "wq_b") == (None, "tensor", None)
    assert spec("unit", "blocks", 0, "attn", "wq_b") == (None, None, "tensor", None)
    assert spec("prefix", 0, "attn", "wo") == ("tensor", None, None)
    assert spec("prefix", 0, "mlp", "gate") == (None, "tensor")
    assert spec("head", "kernel") == (None, "tensor")
    assert spec("embed", "embedding") == ("tensor", None)
    assert spec("unit", "blocks", 0, "mlp", "router", "weight") == (None, None, None)
    # Really split: each device holds 4 of the 8 experts, and the array spans all 8 devices.
    gate = values[("unit", "blocks", 0, "mlp", "experts", "gate")]
    assert {s.data.shape for s in gate.addressable_shards} == {(3, 4, 64, 32)}
    assert len(gate.sharding.device_set) == 8


def test_init_on_mesh_equals_single_device_init(sharded_v3, tiny_v3):
    _, sharded = sharded_v3
    _, single = tiny_v3
    a, b = flat_values(sharded), flat_values(single)
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_array_equal(np.asarray(a[path]), np.asarray(b[path]), err_msg=str(path))


def test_abstract_with_mesh_matches_init(sharded_v3, mesh):
    cfg, params = sharded_v3
    abstract = flat_values(model.abstract(cfg, mesh))
    for path, array in flat_values(params).items():
        assert abstract[path].shape == array.shape and abstract[path].dtype == array.dtype, path
        assert dims(abstract[path].sharding.spec, array.ndim) == dims(array.sharding.spec, array.ndim), path


def test_init_with_serve_rules(mesh):
    cfg = config.preset("tiny-v3", num_nextn_predict_layers=0)
    abstract = flat_values(model.abstract(cfg, make_mesh(fsdp=2, expert=2, tensor=2), rules="serve"))
    # serve has no fsdp: embed dims stay whole even on an fsdp mesh; train would put them on fsdp.
    assert dims(abstract[("prefix", 0, "attn", "wq_a")].sharding.spec, 2) == (None, None)
    train = flat_values(model.abstract(cfg, make_mesh(fsdp=2, expert=2, tensor=2), rules="train"))
    assert dims(train[("prefix", 0, "attn", "wq_a")].sharding.spec, 2) == ("fsdp", None)


# ---------------------------------------------------------------------------------------------------------------
# constrain


def test_constrain_is_a_noop_without_a_mesh():
    x = jnp.arange(24.0).reshape(2, 3, 4)
    assert constrain(x, (Axis.BATCH, Axis.SEQ, Axis.EMBED)) is x
    with jax.set_mesh(make_mesh()):  # a mesh of size 1 shards nothing either
        assert constrain(x, (Axis.BATCH, Axis.SEQ, Axis.EMBED)) is x


def test_constrain_pins_under_a_mesh(mesh):
    x = jnp.arange(8 * 4 * 6, dtype=jnp.float32).reshape(8, 4, 6)
    fn = jax.jit(lambda a: constrain(a * 2, (Axis.BATCH, Axis.SEQ, Axis.EMBED)))
    with jax.set_mesh(mesh):
        out = fn(x)
        with sharding.use_rules("serve"):
            served = jax.jit(lambda a: constrain(a * 2, (Axis.BATCH, Axis.SEQ, Axis.HEADS)))(x)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x) * 2)
    assert dims(out.sharding.spec, 3) == (("data", "expert"), None, None)
    assert dims(served.sharding.spec, 3) == ("data", None, "tensor")
    # A dimension keeps the leading axes that divide it: batch 2 of (data, expert) splits over data alone.
    with jax.set_mesh(mesh):
        small = fn(x[:2])
    assert dims(small.sharding.spec, 3) == ("data", None, None)


def test_fsdp_fallback_splits_weights_without_embed():
    """V4's wq_b [q_lora, heads, head_dim] and wo_a [groups, heads, head_dim, o_lora] have no `embed` axis: under
    the train rules they are split over fsdp along their widest dividing dimension, never the stacked layers."""
    from v4jax.sharding import fsdp_fallback

    spec = fsdp_fallback(P(None, "tensor", None), ("q_lora", "heads", "head_dim"), (32, 4, 64), 4)
    assert spec == P(None, "tensor", "fsdp")
    stacked = fsdp_fallback(P(None, None, None), ("layers", None, None), (64, 8, 6), 4)
    assert stacked == P(None, "fsdp", None)  # 64 layers is the widest, but the scan slices that axis
    assert fsdp_fallback(P("fsdp", None), ("embed", "mlp"), (64, 256), 4) == P("fsdp", None)
    assert fsdp_fallback(P(None,), ("head_dim",), (6,), 4) == P(None,)  # nothing 4 divides: whole
    cfg = config.preset("tiny-v4")
    abstract = model.abstract(cfg)
    mesh = make_mesh(fsdp=4, expert=2)
    train = dict(nnx.to_flat_state(state_shardings(abstract, mesh, "train")))
    serve = dict(nnx.to_flat_state(state_shardings(abstract, mesh, "serve")))
    wq_b = next(p for p in train if p[-2:] == ("attn", "wq_b"))
    assert "fsdp" in str(train[wq_b].get_value().spec)
    assert "fsdp" not in str(serve[wq_b].get_value().spec)  # serving never shards weights over fsdp
