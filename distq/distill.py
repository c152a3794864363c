"""Knowledge distillation: a quantised student learns from its float teacher."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def distillation_loss(student_logits, teacher_logits, temperature: float = 2.0,
                      labels: jax.Array | None = None, alpha: float = 0.5) -> jax.Array:
    """Knowledge-distillation loss: ``T^2 KL(softmax(t/T) || softmax(s/T))``, mean over the batch.

    With integer ``labels`` it returns ``alpha * distillation + (1 - alpha) * cross-entropy``.
    The teacher gets no gradient.

    Examples:
      >>> import jax.numpy as jnp, distq
      >>> z = jnp.array([[1.0, 2.0, 3.0]])
      >>> float(distq.distillation_loss(z, z))
      0.0
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    t = jax.lax.stop_gradient(teacher_logits) / temperature
    s = student_logits / temperature
    lt, ls = jax.nn.log_softmax(t, -1), jax.nn.log_softmax(s, -1)
    kl = jnp.sum(jnp.exp(lt) * (lt - ls), axis=-1).mean() * temperature ** 2
    if labels is None:
        return kl
    ce = -jnp.take_along_axis(jax.nn.log_softmax(student_logits, -1), labels[..., None],
                              axis=-1).mean()
    return alpha * kl + (1.0 - alpha) * ce
