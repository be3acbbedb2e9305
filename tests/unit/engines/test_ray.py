"""engines.ray's model actors on a one-CPU node: one torch thread, whatever the node's environment says."""

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


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])
