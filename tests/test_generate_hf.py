"""Greedy generation against transformers' greedy `generate` on random tiny V3 and V4 models.

Random tiny models have near-ties between their two best logits, where float rounding may legitimately pick either
token; steps whose reference top-2 margin is at most 1e-3 are not compared, and a free-running comparison stops at
the first such step (the sequences may part there). A teacher-forced run (our steps fed the reference's tokens)
checks every other step of every row.
"""

import numpy as np
import pytest
import test_hf
import test_hf_v4
import torch

from v4jax import hf, serving
from v4jax.serving import cache as cache_lib
from v4jax.serving import decode

MARGIN = 1e-3
NEW = 24  # prompt 12 + 24 new tokens: crosses the window (8) and the HCA ratio (16) twice


def reference_model(family):
    if family == "v3":
        return test_hf.randomized(test_hf.tiny_hf_config())
    return test_hf_v4.randomized(test_hf_v4.tiny_v4_config())


def their_greedy(reference, prompts):
    with torch.no_grad():
        out = reference.generate(torch.tensor(prompts), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    tokens = out.sequences[:, prompts.shape[1]:].numpy()
    logits = torch.stack(out.logits, dim=1).float().numpy()  # [b, NEW, vocab]
    top2 = np.sort(logits, axis=-1)[..., -2:]
    return tokens, top2[..., 1] - top2[..., 0]


def teacher_forced(cfg, params, prompts, tokens):
    """Our argmax at each generated position, fed the reference's tokens."""
    b = prompts.shape[0]
    cache = cache_lib.init_cache(cfg, b, prompts.shape[1] + NEW)
    logits, cache = decode.prefill(cfg, params, cache, prompts, np.full(b, prompts.shape[1]), chunk=8)
    chosen = []
    for step in range(NEW):
        chosen.append(np.asarray(logits.argmax(-1)))
        logits, cache = decode.decode_step(cfg, params, cache, tokens[:, step], np.ones(b, bool))
    return np.stack(chosen, axis=1)


@pytest.mark.parametrize("family", ["v3", "v4"])
def test_greedy_matches_transformers_generate(tmp_path, family):
    reference = reference_model(family)
    reference.save_pretrained(tmp_path)
    cfg, params = hf.load(tmp_path)
    prompts = np.random.default_rng(3).integers(0, cfg.vocab_size, size=(2, 12))
    theirs, margin = their_greedy(reference, prompts)
    clear = margin > MARGIN
    assert clear.mean() > 0.5, f"too few decisive steps to compare: {clear.mean():.2f}"

    forced = teacher_forced(cfg, params, prompts, theirs)
    np.testing.assert_array_equal(forced[clear], theirs[clear])

    ours = np.array(serving.generate(cfg, params, prompts.tolist(), max_new_tokens=NEW, temperature=0.0))
    for row in range(len(prompts)):
        undecided = np.flatnonzero(~clear[row])
        agree = undecided[0] if undecided.size else NEW  # from the first near-tie on, the sequences may part
        np.testing.assert_array_equal(ours[row, :agree], theirs[row, :agree])
