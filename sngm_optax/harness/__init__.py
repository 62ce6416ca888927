"""The training harness: data, models, the loop, comparisons and the CLI.

Installed with the `[harness]` extra (flax, orbax-checkpoint, mnist1d, tqdm,
matplotlib). The library (`import sngm_optax`) never imports it; the harness
uses only the library's public names.
"""
