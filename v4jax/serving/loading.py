"""What the serving entry points load: a model (a training workdir, a Hugging Face folder, or a preset with random
weights) and the tokenizer that goes with it.

A training workdir (`train.train --workdir DIR`) holds `config.json` (the RunConfig) and `checkpoints/<step>/`
with the whole train state; only the model's variables (`params` + `extras`: router biases, hash tables) are read,
the optimizer state is skipped. Its tokenizer is the run's `train.tokenizer`. A Hugging Face folder uses its
`tokenizer.json` when there is one, the byte tokenizer otherwise (if the vocabulary holds it).
Every failure is a FileNotFoundError or ValueError with a one-line message.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax

from v4jax.config import ModelConfig, RopeScaling
from v4jax.training import data


@dataclasses.dataclass
class Loaded:
    cfg: ModelConfig
    params: Any  # nnx.State: the model's variables
    tokenizer: Any  # data.Tokenizer, or None when the vocabulary cannot hold the byte tokenizer
    name: str  # the model id the server reports


def model_config(fields: dict) -> ModelConfig:
    """A ModelConfig from its JSON form (`RunConfig.to_dict()["model"]`)."""
    fields = dict(fields)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"model config has fields this version does not know: {unknown}")
    if isinstance(fields.get("rope_scaling"), dict):
        fields["rope_scaling"] = RopeScaling(**fields["rope_scaling"])
    return ModelConfig(**fields)


def load_checkpoint(workdir: str | Path, step: int | None = None, mesh=None) -> tuple[ModelConfig, Any, dict]:
    """(model config, model variables, the run config dict) of a training workdir's checkpoint (latest default)."""
    from flax import nnx

    from v4jax import model
    from v4jax.training import checkpoint
    from v4jax.training.step import split_model_state

    workdir = Path(workdir)
    run = _read_run_config(workdir)
    cfg = model_config(run.get("model") or {})
    steps = checkpoint.committed_steps(workdir / checkpoint.CHECKPOINT_DIR)
    if not steps:
        raise FileNotFoundError(f"{workdir}: no committed checkpoint under {workdir / checkpoint.CHECKPOINT_DIR}")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"{workdir}: no checkpoint at step {step} (committed: {steps})")
    params, extras = split_model_state(model.abstract(cfg, mesh))
    with checkpoint.Checkpointer(workdir, run, keep=0, async_save=False) as ckpt:
        state, _ = ckpt.restore({"params": params, "extras": extras}, step=step, partial=True)
    return cfg, nnx.merge_state(state["params"], state["extras"]), run


def _read_run_config(workdir: Path) -> dict:
    if not workdir.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(workdir)!r} does not exist")
    path = workdir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{workdir}: no config.json (expected a training workdir from train.train)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


def checkpoint_tokenizer(run: dict, cfg: ModelConfig):
    """The run's tokenizer (`train.tokenizer`), checked against the model's vocabulary."""
    tokenizer = data.load_tokenizer((run.get("train") or {}).get("tokenizer", "bytes"))
    data.check_vocab(tokenizer.vocab_size, cfg.vocab_size)
    return tokenizer


def folder_tokenizer(path: str | Path, cfg: ModelConfig):
    """`path/tokenizer.json` if present, else the byte tokenizer if the vocabulary holds it, else None."""
    file = Path(path) / "tokenizer.json"
    if file.is_file():
        tokenizer = data.HFTokenizer(file)
        data.check_vocab(tokenizer.vocab_size, cfg.vocab_size)
        return tokenizer
    return data.ByteTokenizer() if cfg.vocab_size >= data.BYTE_VOCAB_SIZE else None


def load(*, checkpoint: str | None = None, hf: str | None = None, preset: str | None = None,
         step: int | None = None, seed: int = 0, mesh=None, name: str | None = None) -> Loaded:
    """Exactly one source: a training workdir, a Hugging Face folder, or a preset with random weights."""
    if sum(x is not None for x in (checkpoint, hf, preset)) != 1:
        raise ValueError("give exactly one of --checkpoint DIR, --hf DIR, --preset NAME")
    if checkpoint is not None:
        cfg, params, run = load_checkpoint(checkpoint, step, mesh)
        return Loaded(cfg, params, checkpoint_tokenizer(run, cfg), name or cfg.name)
    if hf is not None:
        from v4jax import hf as hf_lib

        if not Path(hf).is_dir():
            raise FileNotFoundError(f"Hugging Face folder {hf!r} does not exist")
        cfg, params = hf_lib.load(hf, mesh=mesh)
        return Loaded(cfg, params, folder_tokenizer(hf, cfg), name or Path(hf).resolve().name)
    from v4jax import config, model

    cfg = config.preset(preset)
    tokenizer = data.ByteTokenizer() if cfg.vocab_size >= data.BYTE_VOCAB_SIZE else None
    return Loaded(cfg, model.init(cfg, jax.random.key(seed), mesh=mesh), tokenizer, name or cfg.name)


def encode_text(tokenizer, text: str) -> list[int]:
    """A text prompt as the model saw documents in training: BOS (when the tokenizer has one) + the text."""
    ids = [int(t) for t in tokenizer.encode(text)]
    return ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + ids


__all__ = ["Loaded", "checkpoint_tokenizer", "encode_text", "folder_tokenizer", "load", "load_checkpoint",
           "model_config"]
