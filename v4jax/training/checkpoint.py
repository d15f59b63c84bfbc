"""Checkpoints: orbax CheckpointManager with async saves, keep-last-N, exact resume and restore onto any mesh.

Layout of a run's workdir:

    workdir/config.json                  the resolved RunConfig of the latest start (written atomically)
    workdir/checkpoints/<step>/          one committed checkpoint, three orbax items:
        state/                           the train-state pytree (OCDBT/tensorstore arrays)
        data/                            {"data_state": <data iterator state>, "step": step} (JSON)
        config/                          the resolved RunConfig this checkpoint was written with (JSON)
        commit_success.txt               orbax's commit marker, written just before the final rename
    workdir/checkpoints/trash/           old steps retired by keep-last-N (renamed here, then deleted)
    workdir/incomplete/                  step directories found without a commit marker, moved aside on start

Usage in a loop:

    ckpt = Checkpointer(workdir, run_cfg.to_dict())          # checks config compatibility, writes config.json
    install_signal_handlers()
    if ckpt.latest_step() is not None:
        state, data_state = ckpt.restore(abstract_state)      # straight into abstract_state's shardings
    for ...:
        state, metrics = train_step(state, batch)
        ckpt.save(step, state, data_state)                    # every `train.checkpoint_every` steps, async
        if should_stop(): break
    ckpt.save(step, state, data_state, force=True); ckpt.close()

Atomicity. Orbax writes a step into `<step>.orbax-checkpoint-tmp`, writes `commit_success.txt` into it once every
item is complete, and only then renames it to `<step>` (one atomic rename on a POSIX filesystem). A crash before the
rename leaves only the tmp directory, which no listing here treats as a step and which `Checkpointer.__init__`
deletes. On top of that, `committed_steps` (hence `latest_step` and `restore`) only counts a `<step>` directory that
holds the commit marker in itself and in each item, and `__init__` moves any `<step>` directory failing that test
(a partial copy, a filesystem without atomic rename) into `workdir/incomplete/` before orbax lists the steps, so it
is never picked as latest and never counted by keep-last-N. Old steps are retired by an atomic rename into
`checkpoints/trash/` (orbax's `todelete_subdir`) and deleted from there in the background, so a crash mid-delete
never leaves a half-deleted step in place either.

Pytrees. `state` is any pytree of arrays; `nnx.State` subtrees are saved as their pure dicts (`nnx.to_pure_dict`)
and rebuilt onto the `nnx.State`s of `abstract_state`, so the restored tree has exactly `abstract_state`'s structure
and Variable metadata. Leaves are saved under their key paths (dict keys, sequence indices and namedtuple field
names as strings), so any optax state works. Typed PRNG keys are refused: store `jax.random.key_data(key)` (uint32).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
INCOMPLETE_DIR = "incomplete"
TRASH_DIR = "trash"  # inside CHECKPOINT_DIR (orbax's `todelete_subdir` is relative to it)
COMMIT_MARKER = "commit_success.txt"  # orbax's AtomicRenameTemporaryPath writes it just before the rename
TMP_SUFFIX = ".orbax-checkpoint-tmp"
ITEMS = ("state", "data", "config")

# ---------------------------------------------------------------------------------------------------------------
# config compatibility
#
# The rule: a workdir may be restarted with a different config as long as the checkpointed state still means the
# same thing. So
#   * every `model.*` field must be equal (they fix the parameters' shapes, dtypes and the function they compute),
#     except MODEL_RUNTIME_FIELDS: implementation choices that change neither the parameters nor the function
#     beyond numerics (the name, compute dtype, kernel and MoE-dispatch choices);
#   * `train.*` fields may change (steps, learning rate, schedule, batch size, logging, checkpoint cadence ...),
#     except TRAIN_STATE_FIELDS: the optimizer (it fixes the optimizer state's structure), the data source and the
#     tokenizer (the saved data position and the token ids refer to them).
# A field missing from one side (a config written before the field existed) is compared against its default.

MODEL_RUNTIME_FIELDS = frozenset({"name", "dtype", "moe_impl", "attention_impl", "attention_block_size",
                                  "capacity_factor", "expert_tensor_parallel"})
TRAIN_STATE_FIELDS = frozenset({"optimizer", "data", "tokenizer"})


def _normalise(value):
    """A config value as JSON would give it back (enums -> values, tuples -> lists, dataclasses -> dicts)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)

    def default(x):
        if isinstance(x, enum.Enum):
            return x.value
        if isinstance(x, np.generic):
            return x.item()
        raise TypeError(f"config value {x!r} of type {type(x).__name__} is not JSON-serialisable")

    return json.loads(json.dumps(value, default=default))


def _field_defaults(section: str) -> dict[str, Any]:
    from v4jax.config import ModelConfig
    from v4jax.training.config import TrainConfig

    cls = {"model": ModelConfig, "train": TrainConfig}[section]
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = _normalise(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = _normalise(f.default_factory())
    return out


_MISSING = "<missing>"


def config_diff(old: Mapping, new: Mapping) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """(incompatible, allowed) changes between two RunConfig dicts: {"section.field": (old, new)}."""
    old, new = _normalise(dict(old)), _normalise(dict(new))
    incompatible, allowed = {}, {}
    for section in ("model", "train"):
        a, b = old.get(section) or {}, new.get(section) or {}
        defaults = _field_defaults(section)
        for name in sorted(set(a) | set(b)):
            va, vb = a.get(name, defaults.get(name, _MISSING)), b.get(name, defaults.get(name, _MISSING))
            if va == vb:
                continue
            key = f"{section}.{name}"
            ok = name in MODEL_RUNTIME_FIELDS if section == "model" else name not in TRAIN_STATE_FIELDS
            (allowed if ok else incompatible)[key] = (va, vb)
    return incompatible, allowed


def _raise_incompatible(where: str, incompatible: dict[str, tuple]):
    lines = "\n".join(f"  {key}: {old!r} (saved) -> {new!r} (now)" for key, (old, new) in incompatible.items())
    raise ValueError(
        f"{where} was written with an incompatible config; these fields differ:\n{lines}\n"
        "Model fields (other than name/dtype/kernel choices) and train.optimizer/data/tokenizer must match to "
        "resume. Restore the original values or use a fresh workdir.")


def read_config(workdir) -> dict | None:
    path = Path(workdir) / CONFIG_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text())


def write_config(workdir, run_config_dict: Mapping) -> Path:
    """Write `workdir/config.json` atomically (tmp file, fsync, rename, fsync the directory)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / CONFIG_FILE
    _atomic_write_text(path, json.dumps(_normalise(dict(run_config_dict)), indent=2, sort_keys=True) + "\n")
    return path


def _atomic_write_text(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # directory fsync is not available everywhere
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_compatible(workdir, run_config_dict: Mapping) -> dict[str, tuple]:
    """Raise ValueError naming the differing fields if `workdir` was started with an incompatible config.

    Returns the allowed changes {"section.field": (saved, now)} (empty for a fresh workdir) for the caller to log.
    See MODEL_RUNTIME_FIELDS / TRAIN_STATE_FIELDS for the rule.
    """
    saved = read_config(workdir)
    if saved is None:
        return {}
    incompatible, allowed = config_diff(saved, run_config_dict)
    if incompatible:
        _raise_incompatible(f"workdir {workdir}", incompatible)
    return allowed


# ---------------------------------------------------------------------------------------------------------------
# signals


_STOP = threading.Event()
_PREVIOUS_HANDLERS: dict[int, Any] = {}


def _handler(signum, frame):
    if _STOP.is_set() and signum == signal.SIGINT:
        # a second Ctrl-C: give up on the clean stop
        uninstall_signal_handlers()
        raise KeyboardInterrupt
    log.warning("received %s: will save a checkpoint and stop at the end of this step",
                signal.Signals(signum).name)
    _STOP.set()


def install_signal_handlers(signals=(signal.SIGTERM, signal.SIGINT)):
    """Turn SIGTERM / SIGINT into a flag the loop polls with `should_stop()` (call from the main thread).

    A second SIGINT after the flag is set restores the previous handlers and raises KeyboardInterrupt.
    """
    for sig in signals:
        previous = signal.signal(sig, _handler)
        if previous is not _handler:
            _PREVIOUS_HANDLERS[sig] = previous


def uninstall_signal_handlers():
    """Restore the handlers `install_signal_handlers` replaced (and clear nothing else)."""
    while _PREVIOUS_HANDLERS:
        sig, previous = _PREVIOUS_HANDLERS.popitem()
        signal.signal(sig, previous if previous is not None else signal.SIG_DFL)


def should_stop() -> bool:
    """True once SIGTERM/SIGINT arrived (or `request_stop` was called). Process-local: multi-host loops should
    agree on it across processes (e.g. an all-reduce of the flag) before acting."""
    return _STOP.is_set()


def request_stop():
    _STOP.set()


def reset_stop():
    _STOP.clear()


# ---------------------------------------------------------------------------------------------------------------
# pytree <-> nested string-keyed dict


def _is_state(x) -> bool:
    return isinstance(x, nnx.State)


def _key_name(entry) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _is_typed_key(x) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _flatten(tree) -> tuple[list[tuple[str, ...]], list, Any]:
    """nnx.State subtrees -> pure dicts, then (leaf names, leaves, treedef of that plain tree)."""
    plain = jax.tree.map(lambda x: nnx.to_pure_dict(x) if _is_state(x) else x, tree, is_leaf=_is_state)
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(plain)
    names = [tuple(_key_name(k) for k in path) for path, _ in paths_leaves]
    if len(set(names)) != len(names):
        seen, dup = set(), set()
        for n in names:
            (dup if n in seen else seen).add(n)
        raise ValueError(f"checkpoint: leaf names collide after stringifying keys: {sorted(dup)[:5]}")
    for name, (_, leaf) in zip(names, paths_leaves):
        if _is_typed_key(leaf):
            raise TypeError(f"checkpoint: leaf {'/'.join(name)} is a typed PRNG key; save "
                            "jax.random.key_data(key) (uint32) and wrap it back after restore")
    return names, [leaf for _, leaf in paths_leaves], treedef


def _nest(names, leaves) -> dict:
    out: dict = {}
    for name, leaf in zip(names, leaves):
        node = out
        for part in name[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"checkpoint: leaf name {'/'.join(name)} clashes with a leaf at {part}")
        node[name[-1]] = leaf
    return out


def _walk(nested: Mapping, prefix=()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in nested.items():
        if isinstance(v, Mapping):
            out.update(_walk(v, prefix + (str(k),)))
        else:
            out[prefix + (str(k),)] = v
    return out


def _rebuild_states(abstract, plain_restored):
    """Put the restored pure dicts back into the nnx.State subtrees of `abstract` (same structure and metadata)."""

    def one(a, p):
        if not _is_state(a):
            return p
        flat = []
        for path, variable in nnx.to_flat_state(a):
            value = p
            for k in path:
                value = value[k]
            flat.append((path, variable.replace(value) if isinstance(variable, nnx.Variable) else value))
        return nnx.from_flat_state(flat)

    return jax.tree.map(one, abstract, plain_restored, is_leaf=_is_state)


def _default_sharding():
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _as_abstract(leaf) -> jax.ShapeDtypeStruct:
    """A restore target: ShapeDtypeStructs keep their sharding (the default device if none), arrays give theirs."""
    if isinstance(leaf, jax.ShapeDtypeStruct):
        sharding = leaf.sharding if leaf.sharding is not None else _default_sharding()
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    array = np.asarray(leaf)
    return jax.ShapeDtypeStruct(array.shape, array.dtype, sharding=_default_sharding())


def abstract_like(tree):
    """ShapeDtypeStructs (with each array's sharding) for a concrete state: a restore target from a fresh init."""
    return jax.tree.map(_as_abstract, tree)


def _save_leaf(leaf):
    if isinstance(leaf, (jax.Array, np.ndarray)):
        return leaf
    return np.asarray(leaf)


# Orbax splits the write of a replicated array across its replicas by slicing each shard on device; every new
# (shape, slice) compiles a program, which for a model's few hundred small arrays costs far more than the write
# (a minute for tiny-v4 on 8 CPU devices). Only arrays whose per-replica slice reaches this size are split.
REPLICA_PARALLEL_MIN_BYTES = 16 << 20


def _type_handler_registry():
    """Orbax's default type handlers, with the jax.Array one splitting writes across replicas only when large."""
    th = ocp.type_handlers
    kwargs = {}
    try:  # the default handler records per-array metadata through this store (internal module, optional)
        from orbax.checkpoint._src.metadata import array_metadata_store
        kwargs["array_metadata_store"] = array_metadata_store.Store()
    except ImportError:  # pragma: no cover
        pass
    array = th.ArrayHandler(min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES, **kwargs)
    return th.create_type_handler_registry(
        (int, th.ScalarHandler()), (float, th.ScalarHandler()), (bytes, th.ScalarHandler()),
        (np.number, th.ScalarHandler()), (np.ndarray, th.NumpyHandler()), (jax.Array, array),
        (str, th.StringHandler()))


# ---------------------------------------------------------------------------------------------------------------
# committed steps on disk


def _is_committed(step_dir: Path) -> bool:
    return (step_dir / COMMIT_MARKER).is_file() and all((step_dir / item / COMMIT_MARKER).is_file()
                                                        for item in ITEMS)


def committed_steps(directory) -> list[int]:
    """Steps under a checkpoint directory whose directory and every item carry the commit marker, ascending."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    steps = []
    for child in directory.iterdir():
        if child.is_dir() and child.name.isdigit() and str(int(child.name)) == child.name and _is_committed(child):
            steps.append(int(child.name))
    return sorted(steps)


def _is_primary() -> bool:
    return jax.process_index() == 0


def _sync(name: str):
    if jax.process_count() > 1:
        ocp.multihost.sync_global_processes(name)


def _sweep(workdir: Path, directory: Path):
    """Before orbax lists the steps: delete leftover tmp dirs, move uncommitted step dirs aside, empty the trash."""
    if not directory.is_dir():
        return
    for child in directory.iterdir():
        if not child.is_dir():
            continue
        if TMP_SUFFIX in child.name:
            log.warning("checkpoint: removing the unfinished save %s", child)
            shutil.rmtree(child, ignore_errors=True)
        elif child.name.isdigit() and not _is_committed(child):
            target = workdir / INCOMPLETE_DIR / f"{child.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
            target.parent.mkdir(parents=True, exist_ok=True)
            log.warning("checkpoint: %s has no commit marker (an interrupted or partial copy); moved to %s",
                        child, target)
            os.replace(child, target)
    _purge(directory / TRASH_DIR)


def _purge(trash: Path):
    if trash.is_dir():
        for child in list(trash.iterdir()):
            shutil.rmtree(child, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# the checkpointer


class Checkpointer:
    """Async orbax checkpoints of a train state + data iterator state + the resolved run config.

    Args:
      workdir: the run directory (checkpoints go to `workdir/checkpoints`, the config to `workdir/config.json`).
      run_config_dict: `RunConfig.to_dict()`; checked against `workdir/config.json` (ValueError if incompatible,
        see `check_compatible`), then written there and into every checkpoint.
      keep: checkpoints to keep (the newest); None: `train.keep_checkpoints` (3 if absent); 0: keep all.
      every: `save` saves when `step % every == 0`; default `train.checkpoint_every`; 0: only forced saves.
      async_save: write in a background thread (`save` returns once arrays are copied to host memory, so the
        caller may donate or delete them right away).
    """

    def __init__(self, workdir, run_config_dict: Mapping, keep: int | None = None, async_save: bool = True,
                 every: int | None = None, async_timeout_s: int = 3600):
        self.workdir = Path(workdir).absolute()
        self.directory = self.workdir / CHECKPOINT_DIR
        self.config = _normalise(dict(run_config_dict))
        train = self.config.get("train") or {}
        self.keep = train.get("keep_checkpoints", 3) if keep is None else keep
        self.every = train.get("checkpoint_every", 0) if every is None else every
        self.async_save = async_save
        self.config_changes = check_compatible(self.workdir, self.config)
        if self.config_changes:
            log.warning("checkpoint: resuming %s with changed settings: %s", self.workdir,
                        {k: f"{a!r} -> {b!r}" for k, (a, b) in self.config_changes.items()})
        _sync("v4jax_checkpointer_checked")  # every process read the old config.json before it is replaced
        if _is_primary():
            self.directory.mkdir(parents=True, exist_ok=True)
            write_config(self.workdir, self.config)
            _sweep(self.workdir, self.directory)
        _sync("v4jax_checkpointer_init")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.keep or None,
            todelete_subdir=TRASH_DIR,
            cleanup_tmp_directories=True,
            create=True,
            enable_async_checkpointing=async_save,
            async_options=ocp.AsyncOptions(timeout_secs=async_timeout_s) if async_save else None,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=ITEMS,
            item_handlers={"state": ocp.PyTreeCheckpointHandler(type_handler_registry=_type_handler_registry()),
                           "data": ocp.JsonCheckpointHandler(), "config": ocp.JsonCheckpointHandler()})
        self._purger: threading.Thread | None = None
        self._closed = False

    # ----- queries -----
    def all_steps(self) -> list[int]:
        """Committed steps on disk (an in-flight async save is not one until it commits)."""
        return committed_steps(self.directory)

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def should_save(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    # ----- save -----
    def save(self, step: int, state, data_state: Any = None, force: bool = False) -> bool:
        """Start saving `state` and `data_state` as `step` if it is due (or `force`); True if a save started.

        A step already saved (or being saved) is skipped. With async saves this returns once the arrays are in
        host memory; the write and the commit happen in the background (`wait` blocks on them).
        """
        self._check_open()
        step = int(step)
        if not (force or self.should_save(step)):
            return False
        if step in self._manager.all_steps():  # includes an in-flight save of this step
            return False
        data = {"step": step, "data_state": data_state}
        try:
            if json.loads(json.dumps(data)) != data:
                raise ValueError("it does not survive a JSON round trip (tuples, non-string keys?)")
        except (TypeError, ValueError) as e:
            raise ValueError(f"checkpoint: data_state must be plain JSON (dict/list/str/int/float/bool/None): {e}")
        names, leaves, _ = _flatten(state)
        tree = _nest(names, [_save_leaf(x) for x in leaves])
        self._start_purge()
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(tree), data=ocp.args.JsonSave(data),
            config=ocp.args.JsonSave(self.config)), force=True)
        return True

    def wait(self):
        """Block until every pending save is committed (and retired steps are renamed away)."""
        self._manager.wait_until_finished()

    # ----- restore -----
    def restore(self, abstract_state, step: int | None = None, partial: bool = False) -> tuple[Any, Any]:
        """(state, data_state) of `step` (default: the latest committed), arrays placed in the shardings of
        `abstract_state` (ShapeDtypeStructs, or arrays whose shardings are reused), so any mesh works.

        `partial=True` restores a subset (e.g. `{"params": ...}` for evaluation): checkpoint entries that
        `abstract_state` lacks are skipped instead of being an error.
        Raises FileNotFoundError without a committed step, ValueError if the checkpoint's tree, shapes or dtypes
        differ from `abstract_state` or its model config is incompatible with this run's.
        """
        self._check_open()
        self.wait()
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no committed checkpoint under {self.directory}")
            step = steps[-1]
        elif step not in steps:
            raise FileNotFoundError(f"step {step} is not a committed checkpoint under {self.directory} "
                                    f"(committed: {steps})")
        # the small JSON items first: an incompatible checkpoint is rejected before any array is read
        small = self._manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore(),
                                                                    config=ocp.args.JsonRestore()))
        incompatible, _ = config_diff(small["config"], self.config)
        if incompatible:
            _raise_incompatible(f"checkpoint {self.directory / str(step)}", incompatible)
        names, leaves, treedef = _flatten(abstract_state)
        targets = [_as_abstract(leaf) for leaf in leaves]
        self._check_tree(step, names, targets, partial)
        target = _nest(names, targets)
        restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=target, partial_restore=partial, restore_args=ocp.checkpoint_utils.construct_restore_args(target))))
        flat = _walk(restored["state"])
        plain = jax.tree_util.tree_unflatten(treedef, [flat[name] for name in names])
        state = _rebuild_states(abstract_state, plain)
        return state, small["data"]["data_state"]

    def _check_tree(self, step: int, names, targets, partial: bool):
        metadata = self._manager.item_metadata(step)["state"]
        tree = getattr(metadata, "tree", metadata)
        saved = _walk(tree) if isinstance(tree, Mapping) else {}
        wanted = dict(zip(names, targets))
        problems = []
        missing = sorted(set(wanted) - set(saved))
        extra = [] if partial else sorted(set(saved) - set(wanted))
        if missing:
            problems.append(f"missing from the checkpoint: {['/'.join(n) for n in missing[:10]]}"
                            + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
        if extra:
            problems.append(f"in the checkpoint but not in abstract_state: {['/'.join(n) for n in extra[:10]]}"
                            + (f" and {len(extra) - 10} more" if len(extra) > 10 else ""))
        for name in sorted(set(wanted) & set(saved)):
            meta, target = saved[name], wanted[name]
            shape, dtype = getattr(meta, "shape", None), getattr(meta, "dtype", None)
            if shape is not None and tuple(shape) != tuple(target.shape):
                problems.append(f"{'/'.join(name)}: shape {tuple(shape)} saved, {tuple(target.shape)} wanted")
            elif dtype is not None and np.dtype(dtype) != np.dtype(target.dtype):
                problems.append(f"{'/'.join(name)}: dtype {np.dtype(dtype)} saved, {np.dtype(target.dtype)} wanted")
        if problems:
            raise ValueError(f"checkpoint step {step} under {self.directory} does not match abstract_state:\n  "
                             + "\n  ".join(problems[:20]))

    # ----- housekeeping -----
    def _start_purge(self):
        if not _is_primary() or (self._purger is not None and self._purger.is_alive()):
            return
        trash = self.directory / TRASH_DIR
        if trash.is_dir() and any(trash.iterdir()):
            self._purger = threading.Thread(target=_purge, args=(trash,), name="checkpoint-trash", daemon=True)
            self._purger.start()

    def _check_open(self):
        if self._closed:
            raise RuntimeError("Checkpointer is closed")

    def close(self):
        """Wait for pending saves, close orbax, empty the trash. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._manager.close()
        if self._purger is not None:
            self._purger.join()
        if _is_primary():
            _purge(self.directory / TRASH_DIR)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


__all__ = ["Checkpointer", "abstract_like", "check_compatible", "committed_steps", "config_diff",
           "install_signal_handlers", "read_config", "request_stop", "reset_stop", "should_stop",
           "uninstall_signal_handlers", "write_config", "MODEL_RUNTIME_FIELDS", "TRAIN_STATE_FIELDS"]

