"""The performance suite (`python -m train.bench all`, `v4jax.perf`): its quick run end to end, the workload config
(`configs/bench_tiny_v4`) against the shapes the peers were measured on, the hidden-1024 train configs, the decode
step's byte count and the transformers subprocess' failure path."""

import contextlib
import dataclasses
import io
import json
import math

import numpy as np
import pytest

from configs import bench_hybrid_1024, bench_tiny_v4, bench_v4_1024
from train import bench as cli
from v4jax import cost, hf_v4, perf

# ../shared/peers/hf_bench.py's TINY_V4 (MaxText's deepseek4-tiny as a transformers DeepseekV4Config), copied.
COMPRESS = [0, 0] + [4, 128] * 20 + [4]
TINY_V4 = dict(
    vocab_size=129280, hidden_size=64, moe_intermediate_size=64, num_hidden_layers=43,
    num_attention_heads=4, num_key_value_heads=1, head_dim=32, qk_rope_head_dim=32,
    q_lora_rank=16, o_groups=4, o_lora_rank=16, sliding_window=32,
    n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1,
    scoring_func="sqrtsoftplus", norm_topk_prob=False, routed_scaling_factor=1.0, swiglu_limit=10.0,
    hc_mult=4, hc_sinkhorn_iters=20, num_hash_layers=3, compress_ratios=COMPRESS,
    index_n_heads=4, index_head_dim=32, index_topk=16,
    rope_theta=10000.0, compress_rope_theta=160000.0, max_position_embeddings=4096,
    rms_norm_eps=1e-6, tie_word_embeddings=False,
)


def test_bench_tiny_v4_has_the_peers_shapes():
    run = bench_tiny_v4.config()
    cfg = run.model
    assert cfg.num_hidden_layers == 43 and cfg.explicit_pattern.startswith("WWCHCH")
    assert cfg.explicit_pattern == "WW" + "CH" * 20 + "C"
    assert (cfg.hidden_size, cfg.vocab_size, cfg.num_attention_heads, cfg.head_dim, cfg.qk_rope_head_dim) == \
        (64, 129_280, 4, 32, 32)
    assert (cfg.q_lora_rank, cfg.o_groups, cfg.o_lora_rank, cfg.sliding_window) == (16, 4, 16, 32)
    assert (cfg.csa_compress_ratio, cfg.hca_compress_ratio) == (4, 128)
    assert (cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk) == (4, 32, 16)
    assert (cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.n_shared_experts) == \
        (16, 4, 64, 1)
    assert (cfg.scoring_func.value, cfg.norm_topk_prob, cfg.routed_scaling_factor, cfg.swiglu_limit) == \
        ("sqrtsoftplus", False, 1.0, 10.0)
    assert (cfg.first_hash_layers, cfg.hc_mult, cfg.hc_sinkhorn_iters, cfg.num_nextn_predict_layers) == (3, 4, 20, 0)
    assert (cfg.dtype, run.train.compute_dtype, run.train.optimizer.value) == ("float32", "float32", "adamw")
    assert (run.train.batch_size, run.train.seq_len) == (4, 512)
    # the peers' config read through our HF mapping is the same model, field for field
    theirs = hf_v4.config_from_hf(dict(TINY_V4))
    differ = {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(theirs, f.name)}
    assert differ == {"name", "pattern", "attention_block_size"}  # pattern: unexpanded vs expanded, same layers
    assert theirs.explicit_pattern == cfg.explicit_pattern


def test_bench_tiny_v4_parameter_count_matches_transformers():
    """cost.params against an independent count: transformers' DeepseekV4ForCausalLM built from the peers' config."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        reference = transformers.DeepseekV4ForCausalLM(transformers.DeepseekV4Config(**TINY_V4))
    total, _ = cost.params(bench_tiny_v4.model())
    assert total == sum(p.numel() for p in reference.parameters()) == 27_167_315


def test_bench_1024_configs():
    """The two hidden-1024 train workloads: the architectures they name, at hidden 1024, batch 4 x 512."""
    v4, hybrid = bench_v4_1024.config(), bench_hybrid_1024.config()
    for run in (v4, hybrid):
        assert run.model.hidden_size == 1024 and run.model.vocab_size <= 32_768
        assert (run.train.batch_size, run.train.seq_len, run.train.optimizer.value) == (4, 512, "adamw")
        assert (run.model.dtype, run.train.compute_dtype, run.model.num_nextn_predict_layers) == ("float32",) * 2 + (0,)
        assert not run.model.scan_layers and run.model.moe_impl.value == "einsum" and run.model.capacity_factor
    cfg = v4.model
    assert set(cfg.explicit_pattern) == {"W", "C", "H"} and cfg.hc_mult == 4 and cfg.first_hash_layers >= 1
    assert [s.mlp.value for s in cfg.layers][:cfg.first_hash_layers] == ["hash"] * cfg.first_hash_layers
    cfg = hybrid.model
    assert set(cfg.explicit_pattern) == {"M", "S"} and cfg.hc_mult == 1 and cfg.n_routed_experts > 0
    assert perf.CONFIGS_1024 == ("bench_v4_1024", "bench_hybrid_1024")


def test_decode_read_bytes_counts_active_weights_and_the_cache():
    cfg = bench_tiny_v4.model()
    reads = perf.decode_read_bytes(cfg, 320)
    total, active = cost.params(cfg)
    w = reads["weights"]
    assert w["embedding"] == 4 * cfg.hidden_size  # one looked-up row of the untied table
    assert reads["weights_bytes"] == sum(w.values()) == 4 * active + 4 * cfg.hidden_size
    assert w["head"] == 4 * cfg.vocab_size * cfg.hidden_size
    routed = cfg.n_routed_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    skipped = (cfg.n_routed_experts - cfg.num_experts_per_tok) * routed // cfg.n_routed_experts
    assert reads["weights_all_experts_bytes"] - reads["weights_bytes"] == 4 * cfg.num_hidden_layers * skipped
    fmt = cost.plain_format(np.dtype("float32"))
    assert reads["cache_bytes"] == cost.kv_cache_bytes(cfg, 320, fmt, include_state=True) > 0
    assert reads["bytes"] == reads["weights_bytes"] + reads["cache_bytes"]


def test_transformers_peer_failure_is_a_clear_skip(monkeypatch):
    """A child that dies gives {"skipped": ...} naming its exit code and its last stderr lines."""
    monkeypatch.setattr(perf.hf, "save", lambda *args: None)
    monkeypatch.setattr(perf, "_peer_source", lambda: "import sys\nprint('no weights here', file=sys.stderr)\n"
                                                      "sys.exit(3)\n")
    relayed = []
    out = perf.transformers_peer(perf.workload(quick=True), None, repeats=1, prompt=4, new_tokens=2,
                                 progress=relayed.append)
    assert set(out) == {"skipped"}
    assert "exited with code 3" in out["skipped"] and "no weights here" in out["skipped"]
    assert "no weights here" in relayed  # the child's stderr is relayed as progress
    monkeypatch.setattr(perf, "_peer_source", lambda: "print('not json')\n")
    out = perf.transformers_peer(perf.workload(quick=True), None, repeats=1, prompt=4, new_tokens=2)
    assert "printed no JSON" in out["skipped"] and "not json" in out["skipped"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_all")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert cli.main(["all", "--out", str(out), "--quick"]) == 0
    return out, json.loads((out / "bench.json").read_text()), stdout.getvalue()


def test_all_quick_writes_the_figures(quick):
    out, r, printed = quick
    for key in ("quick", "workload", "cpu", "v4jax", "transformers", "maxtext", "ratios", "targets", "markdown"):
        assert key in r, key
    assert r["quick"] is True and r["workload"]["config"] == "bench_tiny_v4"
    cpu = r["cpu"]
    assert cpu["peak_flops"] == max(cpu["peak_measurements"]) > 0
    assert cpu["memory_bandwidth"] == max(cpu["bandwidth_measurements"]) > 1e8  # bytes/s
    train, fwd, dec = r["v4jax"]["train"], r["v4jax"]["forward"], r["v4jax"]["decode"]
    assert train["tokens_per_s"] > 0 and fwd["tokens_per_s"] > 0 and dec["ms_per_token"] > 0
    assert train["compile_s"] > 0
    assert 0 < train["mfu"] < 1
    assert train["mfu"] == pytest.approx(train["flops_per_step"] / train["step_time_s"] / cpu["peak_flops"])
    # the decode roofline: bytes read over the bandwidth measured in this run
    reads = dec["read_bytes"]
    assert reads["context"] == dec["prompt"] + dec["new_tokens"]
    assert reads["cache_bytes"] == reads["cache_bytes_decoded"] > 0  # the shapes' bytes are the decoded cache's
    assert reads["bytes"] == reads["weights_bytes"] + reads["cache_bytes"] > reads["cache_bytes"]
    assert dec["bound_ms"] > 0
    assert dec["bound_ms"] == pytest.approx(1e3 * reads["bytes"] / cpu["memory_bandwidth"])
    assert dec["bound_all_experts_ms"] > dec["bound_ms"]
    assert dec["over_bound"] == pytest.approx(dec["ms_per_token"] / dec["bound_ms"])
    # the hidden-1024 train rows (shrunk in a quick run)
    trains = r["v4jax"]["train_1024"]
    assert list(trains) == list(perf.CONFIGS_1024)
    for t in trains.values():
        assert t["tokens_per_s"] > 0 and t["step_time_s"] > 0 and t["compile_s"] > 0 and t["flops_per_step"] > 0
        assert 0 < t["mfu"] < 1
        assert t["mfu"] == pytest.approx(t["flops_per_step"] / t["step_time_s"] / cpu["peak_flops"])
        assert t["tokens_per_s"] == pytest.approx(t["batch"] * t["seq"] / t["step_time_s"])
    assert set(trains["bench_v4_1024"]["pattern"]) == {"C", "H"}
    assert set(trains["bench_hybrid_1024"]["pattern"]) == {"M", "S"}
    # transformers, measured in a fresh subprocess: finite figures on the same model and ids, or a clear skip
    peer = r["transformers"]
    if "skipped" in peer:
        assert len(peer["skipped"]) > 20 and set(peer) == {"skipped"}
    else:
        figures = [peer["forward"]["tokens_per_s"], peer["train"]["tokens_per_s"], peer["decode"]["ms_per_token"]]
        assert all(math.isfinite(f) and f > 0 for f in figures)
        assert peer["params"] == r["workload"]["params"]  # the same model, exported from ours
        assert peer["jax_imported"] is False and "subprocess" in peer["process"]
        assert peer["decode"]["prompt"] == dec["prompt"] and peer["decode"]["new_tokens"] == dec["new_tokens"]
    ratios = r["ratios"]
    if "skipped" not in peer:
        assert ratios["forward_vs_transformers"] == pytest.approx(fwd["tokens_per_s"] /
                                                                  peer["forward"]["tokens_per_s"])
        assert ratios["train_vs_transformers"] == pytest.approx(train["tokens_per_s"] / peer["train"]["tokens_per_s"])
        assert ratios["decode_transformers_over_v4jax"] == pytest.approx(peer["decode"]["ms_per_token"] /
                                                                         dec["ms_per_token"])
    assert ratios["train_vs_maxtext"] == pytest.approx(train["tokens_per_s"] / 328.0)
    assert ratios["forward_vs_transformers_recorded"] == pytest.approx(fwd["tokens_per_s"] / 952.0)
    assert ratios["decode_transformers_recorded_over_v4jax"] == pytest.approx(62.0 / dec["ms_per_token"])
    mt = r["maxtext"]
    assert ("skipped" in mt and len(mt["skipped"]) > 20) or mt.get("train_tokens_per_s", 0) > 0
    targets = {t["name"]: t for t in r["targets"]}
    assert len(targets) == (4 if "skipped" in peer else 6) + len(perf.CONFIGS_1024)
    compile_target = targets["cold compile <= MaxText's"]
    assert (compile_target["value"], compile_target["target"]) == (train["compile_s"], 33.0)
    for t in targets.values():
        assert t["pass"] == (t["value"] >= t["target"] if t["op"] == ">=" else t["value"] <= t["target"])
    assert targets["decode ms/token <= 6"]["value"] == dec["ms_per_token"]
    assert targets["decode within 2x of the bandwidth bound"]["value"] == dec["over_bound"]
    for name, t in trains.items():
        target = targets[f"train MFU >= 40% at hidden 1024 ({name})"]
        assert (target["value"], target["target"], target["unit"]) == (t["mfu"], 0.4, "%")
    # the table: printed on stdout and written next to the JSON
    assert printed.strip() == r["markdown"] == (out / "bench.md").read_text().strip()
    first_table = r["markdown"].split("\n\n")[1]
    rows = [line.split("|")[1].strip() for line in first_table.splitlines() if line.startswith("| ")]
    assert rows == ["figure", *perf.ROWS]
    # before / after the profile-driven fixes, interleaved in this run; the sparse-scaling section
    ba = r["before_after"]
    assert list(ba) == ["before", "after"] and ba["before"]["vs_first"] == 1.0
    assert all(x["step_s"] > 0 and x["compile_s"] > 0 for x in ba.values())
    assert ba["after"]["loss"] == pytest.approx(ba["before"]["loss"], rel=1e-3)  # the same model, step for step
    assert "| after / before |" in r["markdown"]
    sparse = r["sparse"]
    assert sparse["cache_1m"]["v4"]["bytes"] < sparse["cache_1m"]["v3"]["bytes"]
    assert "V3 MLA / V4-Flash" in r["markdown"]
    assert "MaxText: skipped: " in r["markdown"] or "MaxText: measured" in r["markdown"]
    assert "PASS" in r["markdown"] or "FAIL" in r["markdown"]
    assert ">= 40%" in r["markdown"] and "<= x2" in r["markdown"] and "<= 6 ms" in r["markdown"]


@pytest.mark.parametrize("argv", [["all"], ["all", "--out", "FILE"]])
def test_all_bad_input_exits_2(argv, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as e:
        cli.main([str(blocker) if a == "FILE" else a for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("python -m train.bench") or "error" in err[-1]
