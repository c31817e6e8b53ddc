"""Ray Train without the helpers a job of ours cannot use: each would be one more Python process to start.

Ray Train 2.60 builds these unconditionally and offers no public switch, so the trainer subclass below filters
them. A helper is a Ray actor: a fresh Python process that imports Ray (and often Ray Data and pandas), about a
second of CPU on a small machine and all of it before the first step.
"""

from __future__ import annotations

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy


class FixedScalingWithoutAutoscaler(FixedScalingPolicy):
    """A fixed worker count, without registering it with Ray's autoscaling coordinator.

    The coordinator is an actor that forwards resource requests to the cluster autoscaler, so that a cluster
    can add nodes for a job. A cluster started in the driver's own process has no autoscaler and never grows:
    the actor would cost a process at start-up and a call from the controller every few seconds for nothing.
    """

    def after_controller_start(self, train_run_context) -> None:
        self._requester_id = f"train-{train_run_context.run_id}"

    def _maybe_send_resource_request(self) -> None:
        pass

    def _send_resource_request(self) -> None:
        pass


class OrchTorchTrainer(TorchTrainer):
    """TorchTrainer that leaves out what an orch job on this cluster cannot use.

    Always: the Ray Datasets manager (our jobs feed data through Lightning DataModules, never a Ray Dataset).
    On a cluster started in this process (it ends with the driver, placement groups and all, and nothing can
    add nodes to it): the placement group cleaner, which removes a run's placement group when its controller
    dies on a cluster that lives on, and the autoscaling coordinator.
    """

    def _create_default_callbacks(self):
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

        from orchestrator.cluster import started_here

        left_out = (DatasetsCallback, PlacementGroupCleanerCallback) if started_here() else (DatasetsCallback,)
        return [callback for callback in super()._create_default_callbacks() if not isinstance(callback, left_out)]

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        from orchestrator.cluster import started_here

        if started_here() and type(controller_init_kwargs.get("scaling_policy")) is FixedScalingPolicy:
            controller_init_kwargs["scaling_policy"] = FixedScalingWithoutAutoscaler(self.scaling_config)
        return super()._initialize_and_run_controller(**controller_init_kwargs)
