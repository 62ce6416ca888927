"""The training harness: data, models, the loop, comparisons and the CLI.

Installed with the `[harness]` extra (flax, orbax-checkpoint, mnist1d, tqdm,
matplotlib). The library (`import sngm_optax`) never imports it; the harness
uses only the library's public names.
"""

import importlib.util

_MISSING = [name for name in ("flax", "orbax.checkpoint", "mnist1d", "tqdm")
            if importlib.util.find_spec(name.split(".")[0]) is None]
if _MISSING:
  raise ModuleNotFoundError(
      f"sngm_optax.harness needs {', '.join(_MISSING)}: install the harness "
      "extra, e.g. pip install -e \".[harness]\" in a clone, or "
      "pip install \"sngm-optax[harness]\"")
