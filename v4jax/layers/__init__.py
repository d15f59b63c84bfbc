"""Building blocks shared by every family: parameters with logical axes, RMSNorm, RoPE (+YaRN), embedding, MLP."""
