"""engines.ray's model actors on one-CPU nodes: one torch thread, whatever the node's environment says, and one
actor a node, so that a second node adds a second model; and a decode task's worker that lives beside them."""

from __future__ import annotations

import pytest


def test_a_model_actor_on_a_fraction_of_a_cpu_uses_one_thread_even_where_omp_asks_more(ray_cluster):
    """A node whose environment sets OMP_NUM_THREADS (Ray then leaves it alone) must not let each model
    actor spread its forward pass over that many cores: the actor's threads follow its Ray CPUs."""
    import ray

    from dinobatch.engines.ray import _ACTOR_CPUS, _cpu_threads

    def threads() -> tuple[int, int]:
        import torch

        before = torch.get_num_threads()
        _cpu_threads()
        return before, torch.get_num_threads()

    ray.init(address=ray_cluster.address, include_dashboard=False, log_to_driver=False)
    try:
        task = ray.remote(threads).options(num_cpus=_ACTOR_CPUS, runtime_env={"env_vars": {"OMP_NUM_THREADS": "2"}})
        before, after = ray.get(task.remote(), timeout=120)
    finally:
        ray.shutdown()
    assert before == 2, "the node's OMP_NUM_THREADS did not reach the worker: the test shows nothing"
    assert after == 1


def test_two_model_actors_on_two_one_cpu_nodes_run_on_different_nodes(ray_cluster):
    """The model actors' reservation keeps two of them off one one-CPU node: on the two-node cluster each
    node runs a model (with 0.25 CPU, Ray put both on the head and the second node only decoded)."""
    import ray

    from dinobatch.engines.ray import _ACTOR_CPUS, _TASK_CPUS

    @ray.remote
    class Where:
        def node(self) -> str:
            return ray.get_runtime_context().get_node_id()

    ray.init(address=ray_cluster.address, include_dashboard=False, log_to_driver=False)
    try:
        actors = [Where.options(num_cpus=_ACTOR_CPUS).remote() for _ in range(2)]
        nodes = ray.get([a.node.remote() for a in actors], timeout=120)
        task = ray.remote(lambda: ray.get_runtime_context().get_node_id()).options(num_cpus=_TASK_CPUS)
        beside = ray.get(task.remote(), timeout=120)  # a decode task still fits beside the actors
    finally:
        ray.shutdown()
    assert len(set(nodes)) == 2
    assert beside in nodes


_WORKER_KEPT = """
import os, time
import ray
from dinobatch.engines.ray import _ACTOR_CPUS, _TASK_CPUS
from dinobatch.engines.ray_common import connected

@ray.remote
class Model:
    def pid(self):
        return os.getpid()

with connected(None):
    actors = [Model.options(num_cpus=_ACTOR_CPUS).remote() for _ in range(int(ray.cluster_resources()["CPU"]))]
    ray.get([a.pid.remote() for a in actors], timeout=120)
    decode = ray.remote(lambda: os.getpid()).options(num_cpus=_TASK_CPUS)
    first = ray.get(decode.remote(), timeout=120)
    time.sleep(4)  # Ray kills an idle worker beyond its allowance after 1 s
    print(first, ray.get(decode.remote(), timeout=120))
"""


@pytest.mark.slow  # a whole local Ray and a 4 s wait
def test_a_ray_started_for_the_run_keeps_a_decode_tasks_worker_while_the_model_actors_fill_its_cpus():
    """The Ray that classify starts itself (no --address) keeps an idle decode worker beside the model actors:
    with Ray's defaults (one idle worker a CPU, which the actors fill) the worker was killed after a second's
    wait and every later decode task paid a new worker's start and imports. In a fresh interpreter: a local
    Ray started and stopped in the test process leaves Ray Data state that breaks the cluster tests after it."""
    import subprocess
    import sys

    pytest.importorskip("ray", reason="the ray extra (dinobatch[ray]) is not installed")
    done = subprocess.run([sys.executable, "-c", _WORKER_KEPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    first, second = done.stdout.split()[-2:]
    assert second == first, "the decode task's worker was killed while idle and a new one started"

if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])
