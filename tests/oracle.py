"""Helpers shared by the transformers oracle tests."""

import numpy as np
import torch


def torch_logits(reference, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return reference(torch.tensor(tokens)).logits.float().numpy()


def assert_close(ours, theirs, rel=1e-4) -> float:
    """Max abs error below `rel` of the logit scale; returns the relative error."""
    scale = float(np.abs(theirs).max())
    err = float(np.abs(np.asarray(ours) - theirs).max())
    assert err < rel * scale, f"max abs error {err:.3g} vs logit scale {scale:.3g}"
    return err / scale
