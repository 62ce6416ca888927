"""CPU-time probe: exact vs the rewritten 'sampled' top-k on layered vectors."""
import time, jax, jax.numpy as jnp, numpy as np, sys
sys.path.insert(0, ".")  # run from the repository root
from sngm_optax import top_k_by_magnitude
from sngm_optax import _top_k
rng=np.random.default_rng(0)
for n, dens in [(25_600_000, 0.01), (25_600_000, 0.001), (1_000_000, 0.01)]:
  k=int(n*dens)
  x=rng.normal(size=n).astype(np.float32)
  x*=np.repeat(10.0**rng.uniform(-2,2,161), -(-n//161))[:n].astype(np.float32)
  x=jnp.asarray(x)
  ref=None
  print(n, dens, _top_k._sampled_plan(n,k), flush=True)
  for sel in ["exact","sampled"]:
    g=jax.jit(lambda v: top_k_by_magnitude(v,k,sel)); r=g(x).block_until_ready()
    t0=time.process_time(); t=time.perf_counter()
    for _ in range(3): r=g(x).block_until_ready()
    r=set(np.asarray(r).tolist())
    if ref is None: ref=r
    print(" ", sel, round((time.perf_counter()-t)/3*1e3,1),"ms wall", round((time.process_time()-t0)/3*1e3,1),"ms cpu", "recall", len(ref&r)/k, flush=True)
