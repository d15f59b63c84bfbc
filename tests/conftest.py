"""Test setup: 8 fake CPU devices (set before jax is imported), fp32 matmuls, shared tiny fixtures."""

import gc
import os

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from v4jax import config, model  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every compiled program after each test module. Each XLA:CPU executable maps its own code pages (a
    tiny model's forward about 650 mappings); one process compiling the whole suite's programs reached the kernel's
    per-process limit (vm.max_map_count, 65530 here), where XLA aborts mid-test."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def tiny_v3():
    cfg = config.preset("tiny-v3")
    return cfg, model.init(cfg, jax.random.key(0))


@pytest.fixture(scope="session")
def tiny_hybrid():
    cfg = config.preset("tiny-hybrid")
    return cfg, model.init(cfg, jax.random.key(0))


@pytest.fixture(scope="session")
def tokens():
    return jax.random.randint(jax.random.key(1), (4, 40), 0, 512)


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the `slow` tests: full-preset TPU compiles")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="a full-preset compile (minutes): run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
