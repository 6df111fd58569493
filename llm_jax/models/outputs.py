"""What every model family returns: named outputs that heads fill and tasks read."""

from __future__ import annotations

import flax
import jax


@flax.struct.dataclass
class Outputs:
    """Final hidden states, the pooled vector (encoders with a pooler) and each head's output by head name,
    e.g. heads["lm"] = logits_BTV, heads["nsp"] = logits_B2, heads["classifier"] = logits_BC."""

    hidden_BTD: jax.Array
    pooled_BD: jax.Array | None = None
    heads: dict[str, jax.Array] = flax.struct.field(default_factory=dict)
