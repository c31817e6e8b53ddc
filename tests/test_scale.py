"""Scale: typed strategy options, the memory planner and its advice, DDP and FSDP on real Ray (gloo, 2 workers)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
from torch import nn

from conftest import ASSETS, REPO, only_run, run_orch
from orchestrator.errors import SpecError
from orchestrator.loader import load_spec
from orchestrator.plan import build_plan

GPT = REPO / "jobs" / "gpt.yaml"


@pytest.mark.parametrize("overrides, fragments", [
    (["scaling.strategy=fsdp", "scaling.strategy_options.sharding_strategy=FULL_SHRD"],
     ["scaling.strategy_options.sharding_strategy", "'FULL_SHRD' is not allowed", "did you mean 'FULL_SHARD'",
      "FULL_SHARD, SHARD_GRAD_OP, NO_SHARD, HYBRID_SHARD"]),
    (["scaling.strategy=fsdp", "scaling.strategy_options.state_dict=full"],
     ["scaling.strategy_options.state_dict", "unknown option 'state_dict' for strategy fsdp",
      "did you mean 'state_dict_type'"]),
    (["scaling.strategy_options.sharding_strategy=FULL_SHARD"],  # an FSDP option under DDP
     ["unknown option 'sharding_strategy' for strategy ddp", "an option of fsdp", "scaling.strategy_options={}",
      "allowed: find_unused_parameters"]),
    (["scaling.strategy=fsdp", "scaling.strategy_options.cpu_offload=true"],
     ["scaling.strategy_options.cpu_offload", "scaling.use_gpu false"]),
    (["scaling.strategy=fsdp", "scaling.strategy_options.auto_wrap=blcks"],
     ["'blcks' is not allowed", "did you mean 'blocks'", "a list of class paths"]),
    (["trainer.activation_checkpointing=sometimes"],
     ["trainer.activation_checkpointing", "true (the model's repeated blocks), false, or a list"]),
])
def test_strategy_options_are_typed(overrides, fragments):
    with pytest.raises(SpecError) as caught:
        load_spec(GPT, overrides)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, message


def test_bad_strategy_option_in_a_file_exits_2_with_its_line(orch_env, tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(GPT.read_text().replace("  strategy: ddp\n", "  strategy: fsdp\n  strategy_options:\n"
                                           "    sharding_strategy: ZERO3\n"))
    result = run_orch(["submit", str(job)], env=orch_env, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{job}:" in result.stderr and "scaling.strategy_options.sharding_strategy" in result.stderr
    assert "'ZERO3' is not allowed" in result.stderr
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="deepspeed is installed here")
def test_deepspeed_without_the_extra_is_a_spec_error(orch_env):
    result = run_orch(["plan", str(GPT), "scaling.strategy=deepspeed"], env=orch_env, timeout=120)
    assert result.returncode == 2
    assert "scaling.strategy: deepspeed is an optional extra and is not installed" in result.stderr
    assert "orchestrator[deepspeed]" in result.stderr


def _memory(overrides):
    spec = load_spec(GPT, overrides)
    return build_plan(spec, str(GPT), check_fit=False).memory


def test_fsdp_shards_model_state_by_world_size():
    ddp = _memory(["scaling.num_workers=2"])
    fsdp2 = _memory(["scaling.num_workers=2", "scaling.strategy=fsdp"])
    fsdp4 = _memory(["scaling.num_workers=4", "scaling.strategy=fsdp"])
    grad_op = _memory(["scaling.num_workers=4", "scaling.strategy=fsdp",
                       "scaling.strategy_options.sharding_strategy=SHARD_GRAD_OP"])
    assert fsdp2.parameters_bytes == ddp.parameters_bytes // 2
    assert fsdp4.optimizer_bytes == ddp.optimizer_bytes // 4
    assert grad_op.parameters_bytes == ddp.parameters_bytes and grad_op.gradients_bytes == ddp.gradients_bytes // 4
    assert fsdp4.activations_bytes == ddp.activations_bytes  # data parallel: each worker its own micro-batch


def test_activations_follow_micro_batch_precision_and_checkpointing():
    base = _memory([])
    double = _memory(["data.init_args.batch_size=32"])
    bf16 = _memory(["trainer.precision=bf16-mixed"])
    checkpointed = _memory(["trainer.activation_checkpointing=true"])
    assert double.activations_bytes == pytest.approx(2 * base.activations_bytes, rel=0.01)
    assert bf16.activations_bytes < 0.8 * base.activations_bytes
    assert checkpointed.activations_bytes < 0.6 * base.activations_bytes
    assert base.peak_bytes >= base.total_bytes + base.activations_bytes


def test_blocks_are_found_in_a_model_that_does_not_name_them():
    from orchestrator.strategies import block_classes

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

    model = nn.Sequential(nn.Linear(4, 4), nn.ModuleList([Layer(), Layer(), Layer()]))
    assert block_classes(model, True) == (Layer,)
    with pytest.raises(ValueError, match="name them as class paths"):
        block_classes(nn.Sequential(nn.Linear(2, 2)), True)


def test_large_shapes_are_planned_for_their_gpus():
    """The 7B example fits 80 GB GPUs only sharded; with DDP the plan says no and recommends FSDP."""
    seven_b = REPO / "jobs" / "gpt-7b.yaml"
    plan = build_plan(load_spec(seven_b), str(seven_b), check_fit=False)
    assert 6.5e9 < plan.parameters.total < 7e9
    assert plan.memory.fits is True and plan.strategy_options["auto_wrap_policy"] == ["Block"]
    ddp_spec = load_spec(seven_b, ["scaling.strategy=ddp", "scaling.strategy_options={}"])
    ddp = build_plan(ddp_spec, str(seven_b), check_fit=False).memory
    assert ddp.fits is False
    assert ddp.recommendations[0]["overrides"]["scaling.strategy"] == "fsdp"


def test_plan_and_submit_refuse_what_does_not_fit(orch_env, tmp_path):
    too_big = ["data.init_args.batch_size=2048", "model.init_args.n_layer=12", "scaling.memory_per_worker_gb=4"]
    plan = run_orch(["plan", str(GPT), *too_big], env=orch_env, timeout=120)
    assert plan.returncode == 0, plan.stderr
    assert "NO:" in plan.stdout and "try" in plan.stdout
    submit = run_orch(["submit", str(GPT), *too_big], env=orch_env, timeout=120, cwd=tmp_path)
    assert submit.returncode == 2, submit.stdout + submit.stderr
    assert "exceeds the 4.00 GiB a worker has" in submit.stderr and "--force" in submit.stderr
    assert not (tmp_path / "mlflow.db").exists()
    # The advice is a set of overrides; taking it makes the plan fit.
    advice = build_plan(load_spec(GPT, too_big), "", check_fit=False).memory.recommendations[0]["overrides"]
    taken = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in advice.items()]
    assert build_plan(load_spec(GPT, too_big + taken), "", check_fit=False).memory.fits is True


@pytest.mark.slow
def test_gpt_trains_with_ddp_on_two_workers(cluster_env, tracking_uri, tmp_path):
    result = run_orch(["submit", str(GPT), "trainer.max_steps=8", "trainer.val_check_interval=4",
                       "trainer.limit_val_batches=2", "checkpoint.every_n_train_steps=4",
                       "data.init_args.max_bytes=200000", "trainer.log_every_n_steps=2",
                       f"checkpoint.storage_path={tmp_path}/ckpt"], env=cluster_env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    client, run = only_run(tracking_uri, "gpt")
    assert run.info.status == "FINISHED"
    assert run.data.tags["orch.strategy"] == "ddp" and run.data.tags["orch.world_size"] == "2"
    assert len(client.get_metric_history(run.info.run_id, "train/loss_step")) >= 3
    assert run.data.metrics["val/loss"] < 5.6  # below ln(256): it learned something in 8 steps
    assert run.data.metrics["plan/peak_bytes"] > run.data.metrics["plan/activations_bytes"] > 0


@pytest.mark.slow
def test_fsdp_sharded_checkpoint_resumes_after_a_failure(cluster_env, tracking_uri, tmp_path):
    """FSDP on 2 gloo workers with activation checkpointing and clipping; a worker fails at step 6, Ray
    restarts the group, and training resumes from the sharded checkpoint of step 4 to finish at step 12."""
    project = tmp_path / "project"
    shutil.copytree(ASSETS / "scale_project", project)
    markers = project / "markers"
    markers.mkdir()
    result = run_orch(["submit", "job.yaml", f"model.init_args.marker_dir={markers}",
                       "model.init_args.fail_once_at_step=6", "trainer.activation_checkpointing=true",
                       f"checkpoint.storage_path={tmp_path}/ckpt"], env=cluster_env, cwd=project, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    _, run = only_run(tracking_uri, "scale")
    assert run.info.status == "FINISHED" and run.data.tags["orch.strategy"] == "fsdp"
    starts = sorted(p.name for p in markers.iterdir() if p.name.startswith("start-"))
    assert starts == ["start-rank0-step0", "start-rank0-step4", "start-rank1-step0", "start-rank1-step4"], starts
    final = Path(run.data.tags["orch.last_checkpoint"]) / "checkpoint.ckpt"
    shards = sorted(p.name for p in final.iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"], shards  # every rank's shard
    import torch

    assert torch.load(final / "meta.pt", weights_only=False)["global_step"] == 12


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_planned_peak_matches_cuda_max_memory_allocated(precision):
    """On a GPU the planner's peak is within ±20 % of torch.cuda.max_memory_allocated for the GPT recipe."""
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    from memory_plan import measured, predicted

    overrides = ["scaling.num_workers=1", "scaling.use_gpu=true", f"trainer.precision={precision}",
                 "model.init_args.n_embd=512", "model.init_args.n_head=8", "model.init_args.n_layer=8"]
    guess, _ = predicted("jobs/gpt.yaml", overrides)
    real = measured("jobs/gpt.yaml", overrides, steps=3, gpu=True)
    assert abs(guess - real) / real < 0.2, (guess, real)
