"""What Ray Train's controller process loads of an orch job, kept free of PyTorch: the backend, the scaling policy.

Ray Train's controller sets up the workers' process group through the trainer's backend (TorchConfig and
_TorchBackend in ray.train.torch.config). That module imports torch at its top, so the controller, a process
that never touches a tensor, imports PyTorch as it unpickles the backend: ~2.6 s of CPU (the controller of a cold
digits job: 6.6 s without this module, 4.0 s with it) and ~0.2 GiB on a small machine, serially before the first
worker is even created. Ray offers no torch-free variant, so the two classes
below repeat what the controller side of Ray's does (pick the backend, find rank 0's address, set the env vars,
start the process group on every rank, tear it down). Everything that runs in a worker is still Ray's own code,
called by name from small functions here, so it is imported where PyTorch is anyway.

Follows ray 2.60.0's ray/train/torch/config.py; tests/test_lean_controller.py checks the two stay in step.
Left out: TPU (tpu_dist, multi-slice) set-up, which an orch job cannot request, and Ray Train V1 worker groups.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import ray
from ray._common.network_utils import build_address
from ray._private import ray_constants
from ray.exceptions import GetTimeoutError
from ray.train._internal.utils import get_address_and_port
from ray.train.backend import Backend, BackendConfig
from ray.train.constants import DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S, TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S
from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy
from ray.train.v2._internal.util import TrainingFramework

log = logging.getLogger(__name__)


@dataclass
class LeanTorchConfig(BackendConfig):
    """TorchConfig's fields and meaning (see ray.train.torch.TorchConfig), with a torch-free backend."""

    backend: str | None = None  # None: nccl where the workers have GPUs, else gloo
    init_method: str = "env"
    timeout_s: int = 1800

    @property
    def backend_cls(self):
        return LeanTorchBackend

    @property
    def train_func_context(self):
        return TorchContextInWorker  # Ray's, imported where it runs: a cold start's driver has no PyTorch


class TorchContextInWorker:
    """Ray's TorchConfigContextManager (the CUDA device of the rank), imported in the worker when it is entered.

    The trainer in the driver wraps the training function in this context; Ray's own class lives in the module
    that imports torch at its top, and the driver of a cold start no longer imports PyTorch at all."""

    def __enter__(self):
        from ray.train.torch.config import TorchConfigContextManager

        self._context = TorchConfigContextManager()
        return self._context.__enter__()

    def __exit__(self, *exc_info):
        return self._context.__exit__(*exc_info)

    @property
    def framework(self):
        return TrainingFramework.TORCH

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "init_method": self.init_method, "timeout_s": self.timeout_s}


class LeanTorchBackend(Backend):
    share_cuda_visible_devices: bool = True  # as Ray's: every rank on a node sees all of the node's job GPUs

    def on_start(self, worker_group, backend_config: LeanTorchConfig) -> None:
        backend = backend_config.backend or (
            "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0 else "gloo")
        master_addr, master_port = worker_group.execute_single(0, get_address_and_port)
        if backend_config.init_method == "env":
            worker_group.execute(_set_master_address, addr=master_addr, port=master_port)
            url = "env://"
        elif backend_config.init_method == "tcp":
            url = f"tcp://{build_address(master_addr, master_port)}"
        else:
            raise ValueError(f"The provided init_method ({backend_config.init_method}) is not supported. Must be "
                             f"either 'env' or 'tcp'.")
        # PyTorch's backends read LOCAL_RANK and the rest before init_process_group.
        worker_group.execute(_set_distributed_env_vars)
        ray.get([
            worker_group.execute_single_async(rank, _setup_process_group, backend=backend, world_rank=rank,
                                              world_size=len(worker_group), init_method=url,
                                              timeout_s=backend_config.timeout_s)
            for rank in range(len(worker_group))
        ])

    def on_shutdown(self, worker_group, backend_config: LeanTorchConfig) -> None:
        futures = worker_group.execute_async(_shutdown_process_group, destroy_process_group=len(worker_group) > 1)
        timeout_s = ray_constants.env_integer(TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
                                              DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S)
        try:
            ray.get(futures, timeout=timeout_s)
        except GetTimeoutError:
            log.warning("Torch process group shutdown timed out after %s seconds", timeout_s)


# Run in the workers. Module-level functions pickle by reference, so the controller never imports what they do.

def _set_master_address(addr: str, port: int) -> None:
    os.environ["MASTER_ADDR"] = addr
    os.environ["MASTER_PORT"] = str(port)


def _set_distributed_env_vars() -> None:
    from ray.train.torch.config import _set_torch_distributed_env_vars

    _set_torch_distributed_env_vars()


def _setup_process_group(**kwargs) -> None:
    from ray.train.torch.config import _setup_torch_process_group

    _setup_torch_process_group(**kwargs)


def _shutdown_process_group(destroy_process_group: bool = False) -> None:
    from ray.train.torch.config import _shutdown_torch

    _shutdown_torch(destroy_process_group=destroy_process_group)


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
