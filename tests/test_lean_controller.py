"""The torch-free parts of Ray Train's controller (lean_controller): what Ray Train's controller unpickles imports no PyTorch, and the Ray
code it repeats has not changed under it. Every 2-worker job in the suite runs its process group through it."""

from __future__ import annotations

import hashlib
import inspect
import subprocess
import sys
from pathlib import Path

import cloudpickle

# sha256 of the source of the Ray classes lean_controller.py repeats (ray 2.60.0). If Ray's changed, read the
# change, carry it into orchestrator/lean_controller.py, and put the new digest here.
RAY_TORCH_BACKEND_SHA256 = "9e05abd0db943eab3e15abe601ce6bd5279a5d1d96c5da96b0ab07bce35e1bcd"


def _ray_torch_backend_source() -> str:
    from ray.train.torch import config

    return inspect.getsource(config.TorchConfig) + inspect.getsource(config._TorchBackend)


def test_the_ray_backend_it_follows_is_the_one_it_was_written_against():
    digest = hashlib.sha256(_ray_torch_backend_source().encode()).hexdigest()
    assert digest == RAY_TORCH_BACKEND_SHA256, (
        "ray.train.torch.config's TorchConfig/_TorchBackend changed since orchestrator/lean_controller.py was "
        "written: carry the change over, then update RAY_TORCH_BACKEND_SHA256")


def test_the_controller_unpickles_the_trainer_without_importing_torch(tmp_path: Path):
    """What the driver hands Ray Train's controller (run context with the backend config, callbacks, the scaling
    policy of an in-process cluster), pickled as Ray pickles actor arguments, loads in a fresh interpreter
    without PyTorch."""
    from ray.train import RunConfig, ScalingConfig

    from orchestrator.lean_controller import FixedScalingWithoutAutoscaler, LeanTorchConfig
    from orchestrator.lean_train import OrchTorchTrainer

    trainer = OrchTorchTrainer(_no_training, scaling_config=ScalingConfig(num_workers=2),
                               run_config=RunConfig(name="pickle-check", storage_path=str(tmp_path)))
    assert isinstance(trainer.backend_config, LeanTorchConfig) and trainer.backend_config.backend == "gloo"
    payload = tmp_path / "controller_args.pkl"
    payload.write_bytes(cloudpickle.dumps((trainer.train_run_context, trainer._create_default_callbacks(),
                                           FixedScalingWithoutAutoscaler(trainer.scaling_config))))
    check = ("import pickle, sys; pickle.loads(open(sys.argv[1], 'rb').read()); "
             "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    loaded = subprocess.run([sys.executable, "-c", check, str(payload)], capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "[]", loaded.stdout


def _no_training(config=None):
    pass
