"""Ray Train without the helpers a job of ours cannot use: each would be one more Python process to start.

Ray Train 2.60 builds these unconditionally and offers no public switch, so the trainer subclass below filters
them. A helper is a Ray actor: a fresh Python process that imports Ray (and often Ray Data and pandas), about a
second of CPU on a small machine and all of it before the first step.
"""

from __future__ import annotations

from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from orchestrator.lean_controller import FixedScalingWithoutAutoscaler, LeanTorchConfig


class OrchTorchTrainer(DataParallelTrainer):
    """Ray's TorchTrainer, less what an orch job cannot use, and without PyTorch in the driver.

    TorchTrainer itself is only DataParallelTrainer with a PyTorch backend, but its module imports torch (for
    Ray's local mode, which an orch job never uses: it always has workers); so the driver builds the trainer
    from DataParallelTrainer and lean_controller's torch-free backend, and never imports PyTorch for it (~1 s of
    CPU on a small machine, beside the workers' start).

    Always:
    - the Ray Datasets manager: our jobs feed data through Lightning DataModules, never a Ray Dataset;
    - the placement group cleaner, a detached actor (a process of its own, ~4 s of CPU on a small machine, as
      it imports Ray Train's state API) that removes a run's placement group if its controller dies while the
      job's driver lives on. Ray ties a placement group to the job's driver (ray-project/ray#58515), and the
      cleaner is there for drivers that outlive their controllers (Ray Tune, asynchronous validation). An orch
      job's driver is `orch submit` itself (or its Ray Jobs entrypoint), which ends as soon as the controller's
      run returns or the controller dies, and Ray then removes the placement group with the job.
    On a cluster started in this process (nothing can add nodes to it): the autoscaling coordinator.
    And what the controller unpickles (the PyTorch backend, the scaling policy) comes from lean_controller, which
    does not import PyTorch: the controller never needs it.
    """

    def __init__(self, train_loop_per_worker, *, torch_config: LeanTorchConfig | None = None, **kwargs):
        torch_config = torch_config or LeanTorchConfig()
        if not torch_config.backend:  # as TorchTrainer picks it (orch jobs never ask for TPUs)
            scaling = kwargs.get("scaling_config")
            torch_config.backend = "nccl" if scaling is not None and scaling.use_gpu else "gloo"
        super().__init__(train_loop_per_worker, backend_config=torch_config, **kwargs)

    def _create_default_callbacks(self):
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

        left_out = (DatasetsCallback, PlacementGroupCleanerCallback)
        return [callback for callback in super()._create_default_callbacks() if not isinstance(callback, left_out)]

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        from orchestrator.cluster import started_here

        if started_here() and type(controller_init_kwargs.get("scaling_policy")) is FixedScalingPolicy:
            controller_init_kwargs["scaling_policy"] = FixedScalingWithoutAutoscaler(self.scaling_config)
        return super()._initialize_and_run_controller(**controller_init_kwargs)
