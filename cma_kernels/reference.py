"""Plain PyTorch Cross-Modal Adapter: the oracle every fused path is tested against.

    out = residual + h + [W_up_unique; W_up_shared] . act(W_down . h + b_down) + [b_up_unique; b_up_shared]

The shared up-projection writes the LAST d_s channels (REFERENCE.md section 1).
"""
import torch
import torch.nn.functional as F

ACTIVATIONS = ("quick_gelu", "gelu")


def activation_fn(name: str, z: torch.Tensor) -> torch.Tensor:
    """quick_gelu (z * sigmoid(1.702 z), CLIP's and the paper's default) or exact gelu."""
    if name == "quick_gelu":
        return z * torch.sigmoid(1.702 * z)
    if name == "gelu":
        return F.gelu(z)
    raise ValueError(f"unknown activation {name!r}; allowed: {', '.join(ACTIVATIONS)}")


def adapter_reference(h, w_down, b_down, w_up_unique, b_up_unique, w_up_shared, b_up_shared,
                      residual=None, activation="quick_gelu", dropout_p=0.0, training=False):
    """Eager adapter, the official semantics (down, act, two up linears, cat, +h, +residual).

    h, residual: [..., D]; w_down: [r, D]; b_down: [r]; w_up_unique: [D - d_s, r];
    b_up_unique: [D - d_s]; w_up_shared: [d_s, r]; b_up_shared: [d_s]. Any float dtype;
    under autocast the linears run in the autocast dtype. Returns [..., D].
    """
    a = activation_fn(activation, F.linear(h, w_down, b_down))
    if dropout_p > 0.0:
        a = F.dropout(a, dropout_p, training)
    up = torch.cat([F.linear(a, w_up_unique, b_up_unique), F.linear(a, w_up_shared, b_up_shared)], dim=-1)
    out = h + up
    return out if residual is None else residual + out
