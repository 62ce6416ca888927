"""A float64 NumPy transcription of the authors' TRSGD / TRAdam step.

Written from the formulas of github.com/huiqu18/TRAlgorithm, not from
sngm_optax._trajectory; shared by the library's and the harness's TR tests.
"""

import numpy as np

INNER_STEPS = 10


def reference(
    kind,
    w0,
    grad_fn,
    num_steps,
    lr_fn,
    lam_fn,
    inner_steps=INNER_STEPS,
    decay=True,
    weight_decay=0.0,
    momentum=0.9,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    eps_after_bias_correction=True,
    steps_per_epoch=None,
):
  """Float64 TRSGD / TRAdam. Returns (params before each step, anchors, final).

  `lam_fn(t, lr)` gives lambda at step t. The authors' Adam adds eps to
  sqrt(v) before bias correction; optax adds it after. With
  `steps_per_epoch`, the window restarts at every epoch's first step.
  """
  w = np.array(w0, np.float64)
  anchor = np.zeros_like(w)
  buf = np.zeros_like(w)
  m = np.zeros_like(w)
  v = np.zeros_like(w)
  k = 0
  history, anchors = [], []
  for t in range(num_steps):
    history.append(w.copy())
    lr = lr_fn(t)
    if steps_per_epoch is not None and t % steps_per_epoch == 0:
      k = 0  # the authors' loop starts a new window with each epoch
    if k == 0:
      anchor = w.copy()
    anchors.append(anchor.copy())
    d = grad_fn(w, t) + 2.0 * lam_fn(t, lr) * (w - anchor)
    d = d + weight_decay * w
    step_lr = lr / (k + 1) if decay else lr
    if kind == "sgd":
      buf = momentum * buf + d
      w = w - step_lr * buf
    else:
      n = t + 1  # never reset
      m = b1 * m + (1 - b1) * d
      v = b2 * v + (1 - b2) * d * d
      if eps_after_bias_correction:
        w = w - step_lr * (m / (1 - b1**n)) / (np.sqrt(v / (1 - b2**n)) + eps)
      else:
        step_size = step_lr * np.sqrt(1 - b2**n) / (1 - b1**n)
        w = w - step_size * m / (np.sqrt(v) + eps)
    k = k + 1 if k < inner_steps - 1 else 0
  return history, anchors, w
