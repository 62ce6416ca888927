"""Two processes on localhost (`jax.distributed`, gloo CPU collectives) give
the same SNGM and GMC trajectories as one process with as many devices."""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np

import multihost_worker

NUM_PROCESSES = 2
LOCAL_DEVICES = 2
TIMEOUT_S = 120
WORKER = pathlib.Path(multihost_worker.__file__).resolve()
REPO = WORKER.parents[1]


def _free_port():
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _child_env():
  env = dict(os.environ)
  # The workers choose their device count themselves (jax_num_cpu_devices);
  # drop the 8 simulated devices that tests/conftest.py asks for.
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(
      [str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  return env


def _run_processes(tmp_path):
  address = f"localhost:{_free_port()}"
  outputs = [tmp_path / f"process{i}.npz" for i in range(NUM_PROCESSES)]
  logs = [open(tmp_path / f"process{i}.log", "w+")
          for i in range(NUM_PROCESSES)]
  processes = [
      subprocess.Popen(
          [sys.executable, str(WORKER), address, str(NUM_PROCESSES), str(i),
           str(LOCAL_DEVICES), str(outputs[i])],
          stdout=logs[i], stderr=subprocess.STDOUT, env=_child_env(),
          cwd=REPO)
      for i in range(NUM_PROCESSES)
  ]
  try:
    codes = [p.wait(timeout=TIMEOUT_S) for p in processes]
  except subprocess.TimeoutExpired:
    codes = None
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
        p.wait()
  report = []
  for i, log in enumerate(logs):
    log.seek(0)
    report.append(f"--- process {i} ---\n{log.read()[-4000:]}")
    log.close()
  if codes is None or any(codes):
    raise AssertionError(
        f"worker processes failed (exit codes {codes}, None = timed out after "
        f"{TIMEOUT_S} s)\n" + "\n".join(report))
  return [dict(np.load(path)) for path in outputs]


def test_two_processes_match_one_process(tmp_path):
  per_process = _run_processes(tmp_path)
  n = NUM_PROCESSES * LOCAL_DEVICES
  mesh = jax.make_mesh((n,), (multihost_worker.AXIS,),
                       devices=jax.devices()[:n])
  expected = multihost_worker.run(mesh)
  for results in per_process:
    assert sorted(results) == sorted(expected)
    for key, value in expected.items():
      np.testing.assert_allclose(results[key], value, rtol=1e-5, atol=1e-6,
                                 err_msg=key)
  # Guard: the runs moved the params, and GMC's memories differ per worker.
  last = multihost_worker.STEPS - 1
  params, _ = multihost_worker._problem()
  for name in ("sngm", "gmc", "gmc_pmap"):
    assert not np.allclose(expected[f"{name}/step{last}/w1"], params["w1"])
  memory = expected["gmc/memory/w1"]
  assert memory.shape[0] == n and not np.allclose(memory[0], memory[1])
