"""The train-step profiler: scope paths parsed from HLO metadata, op time summed per scope, interleaved A/B."""

import dataclasses

import pytest

from v4jax import config, profiling
from v4jax.training.config import RunConfig, TrainConfig

HLO = """
HloModule jit_train_step
  %fusion.1 = f32[4,8]{1,0} fusion(f32[4,8]{1,0} %p), kind=kLoop, metadata={op_name="jit(train_step)/while/body/closed_call/jvp(scanned_unit)/while/body/closed_call/attention/v4_kernel/exp" source_file="k.py"}
  %dot.2 = f32[4,4]{1,0} dot(f32[4,8]{1,0} %a, f32[8,4]{1,0} %b), metadata={op_name="jit(train_step)/while/body/closed_call/transpose(jvp(scanned_unit))/while/body/closed_call/attention/v4_kernel/btnc,bsc->bnts/dot_general"}
  %while.3 = (s32[], f32[4]{0}) while((s32[], f32[4]{0}) %t), condition=%c, body=%b, metadata={op_name="jit(train_step)/while/body/closed_call/jvp(scanned_unit)/while"}
  ROOT %copy.4 = f32[4]{0} copy(f32[4]{0} %x)
"""


def test_scope_key_strips_autodiff_wrappers_and_loop_plumbing():
    name = "jit(train_step)/while/body/closed_call/transpose(jvp(scanned_unit))/while/body/closed_call/mlp/moe_experts/gcd,gdf->gcf/dot_general"
    assert profiling.scope_key(name, 3) == ("scanned_unit/mlp/moe_experts", True)
    assert profiling.scope_key(name, 1) == ("scanned_unit", True)
    assert profiling.scope_key("jit(train_step)/jvp(head_cross_entropy)/exp", 4) == ("head_cross_entropy/exp", False)
    assert profiling.scope_key("", 3) == ("(no scope)", False)


def test_scope_times_sum_events_per_scope_and_skip_loops_and_foreign_events():
    events = [
        {"ph": "X", "name": "fusion.1", "dur": 1000.0},
        {"ph": "X", "name": "fusion.1", "dur": 500.0},  # a loop body runs once per iteration: both count
        {"ph": "X", "name": "dot.2", "dur": 4000.0},
        {"ph": "X", "name": "while.3", "dur": 9000.0},  # its body's ops are the events above
        {"ph": "X", "name": "copy.4", "dur": 250.0},
        {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 7000.0},  # not an HLO instruction
        {"ph": "i", "name": "dot.2"},  # not a complete event
    ]
    rows = profiling.scope_times(events, HLO, depth=3)
    by_scope = {r["scope"]: r for r in rows}
    assert set(by_scope) == {"scanned_unit/attention/v4_kernel", "(no scope)"}
    kernel = by_scope["scanned_unit/attention/v4_kernel"]
    assert kernel["forward_ms"] == pytest.approx(1.5) and kernel["backward_ms"] == pytest.approx(4.0)
    assert kernel["total_ms"] == pytest.approx(5.5) and kernel["ops"] == 3
    assert by_scope["(no scope)"]["total_ms"] == pytest.approx(0.25)
    assert rows[0]["scope"] == "scanned_unit/attention/v4_kernel"  # costliest first


def tiny_run(**train) -> RunConfig:
    cfg = config.preset("tiny-v4", num_hidden_layers=2, pattern="CH", first_hash_layers=1, vocab_size=320,
                        num_nextn_predict_layers=0)
    fields = dict(optimizer="adamw", batch_size=2, seq_len=32, steps=3, checkpoint_every=0, log_every=1)
    return RunConfig(cfg, TrainConfig(**(fields | train)))


def test_profile_of_a_real_step_attributes_most_op_time_to_named_scopes(tmp_path):
    result = profiling.profile_train_step(tiny_run(), tmp_path, depth=2)
    scopes = {r["scope"]: r for r in result["scopes"]}
    assert result["step_s"] > 0 and result["op_ms"] > 0
    assert (tmp_path / "train_step.hlo.txt").exists() and result["trace"].endswith(".trace.json.gz")
    layer_ms = sum(r["total_ms"] for name, r in scopes.items() if name.startswith(("prefix/", "scanned_unit/")))
    assert layer_ms > 0.3 * result["op_ms"]  # the layers, not plumbing, hold the time
    assert any(r["backward_ms"] > 0 for r in result["scopes"]) and any(r["forward_ms"] > 0 for r in result["scopes"])
    assert "| scope |" in profiling.profile_markdown(result)


def test_compare_interleaves_variants_and_reports_ratios_to_the_first():
    base = tiny_run()
    runs = {"fused": base, "unfused": dataclasses.replace(base, train=dataclasses.replace(base.train, loss_chunk=0))}
    result = profiling.compare(runs, steps=2)
    assert list(result) == ["fused", "unfused"]
    assert result["fused"]["vs_first"] == 1.0 and result["unfused"]["vs_first"] > 0
    assert all(len(r["times_s"]) == 2 and r["step_s"] > 0 and r["compile_s"] > 0 for r in result.values())
    assert result["fused"]["loss"] == pytest.approx(result["unfused"]["loss"], rel=1e-4)  # same model, same steps
    with pytest.raises(ValueError, match="variant"):
        profiling.compare({}, steps=1)
