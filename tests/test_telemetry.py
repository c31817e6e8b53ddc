"""Hardware sampling, throughput and MFU without Ray: real samplers and real Lightning runs into a real MLflow store.

NVML is the one faked seam (tests/fake_nvml.py); the real-GPU check is marked `gpu`.
"""

from __future__ import annotations

import sys
import threading
import time

import lightning.pytorch as pl
import psutil
import pytest

from conftest import ASSETS
from fake_nvml import API, FakeGpu, FakeNvml

sys.path.insert(0, str(ASSETS / "telemetry_project"))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One MLflow store for the module (creating one costs seconds); each test gets its own run in it."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def tracking_uri(store) -> str:
    return store


@pytest.fixture
def run(tracking_uri, request):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("telemetry-units")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("telemetry-units")
    return client, client.create_run(experiment_id, run_name=request.node.name).info.run_id


def sampler(tracking_uri, run_id, node, nvml=None, gpus=None, interval_s=0.1):
    from orchestrator.tracking.sender import MetricSender
    from orchestrator.tracking.system import SystemSampler

    return SystemSampler(MetricSender(tracking_uri, run_id, interval_s=0.2), node, interval_s, gpus=gpus,
                         nvml_loader=(lambda: nvml) if nvml is not None else _no_nvml)


def _no_nvml():
    raise AssertionError("a job without GPUs must not touch NVML")


def history(client, run_id, key):
    return [m.value for m in client.get_metric_history(run_id, key)]


def run_for(*samplers, seconds=0.6):
    for s in samplers:
        s.start()
    time.sleep(seconds)
    return [s.stop() for s in samplers]


# -- hardware sampling ---------------------------------------------------------------------------------------------
def test_fake_nvml_only_uses_calls_the_real_module_has():
    import pynvml

    missing = [name for name in API if not hasattr(pynvml, name)]
    assert not missing, missing


def test_cpu_memory_disk_network_and_process_memory(tracking_uri, run):
    client, run_id = run
    (summary,) = run_for(sampler(tracking_uri, run_id, "node-a"))
    metrics = client.get_run(run_id).data.metrics
    total_mb = psutil.virtual_memory().total / 1e6
    cpu = history(client, run_id, "system/node-a/cpu_utilization_percentage")
    assert len(cpu) >= 3 and all(0 <= v <= 100 for v in cpu)
    assert 0 < metrics["system/node-a/system_memory_usage_megabytes"] <= total_mb
    assert 0 < metrics["system/node-a/system_memory_usage_percentage"] <= 100
    # This test process is the "training process": torch and MLflow are loaded, so tens of MB at least.
    assert 30 < metrics["system/node-a/training_processes_rss_megabytes"] < total_mb
    assert 0 < metrics["system/node-a/disk_usage_percentage"] <= 100
    for rate in ("disk_read", "disk_write", "network_receive", "network_transmit"):
        key = f"system/node-a/{rate}_megabytes_per_s"
        if key in metrics:  # absent only where the host exposes no counters (some containers)
            assert metrics[key] >= 0
    assert not [k for k in metrics if "gpu" in k]
    assert summary == {"summary/node-a/cpu_utilization_mean_percentage": pytest.approx(sum(cpu) / len(cpu))}
    assert metrics["summary/node-a/cpu_utilization_mean_percentage"] == pytest.approx(sum(cpu) / len(cpu))


def test_gpu_metrics_through_nvml_for_the_jobs_gpus_only(tracking_uri, run):
    client, run_id = run
    gpus = [FakeGpu("GPU-a"), FakeGpu("GPU-b", utilization=[20, 80]), FakeGpu("GPU-c"),
            FakeGpu("GPU-d", utilization=[100], memory_used=40 * 10**9, power_mw=412_500, temperature_c=71,
                    sm_clock_mhz=1755)]
    nvml = FakeNvml(gpus)
    (summary,) = run_for(sampler(tracking_uri, run_id, "node-a", nvml, gpus=["GPU-b", "GPU-d"]))
    metrics = client.get_run(run_id).data.metrics
    gpu_keys = {k for k in metrics if k.startswith("system/node-a/gpu_")}
    assert {k.split("/")[2].split("_")[1] for k in gpu_keys} == {"1", "3"}  # NVML's indices, as nvidia-smi shows
    assert metrics["system/node-a/gpu_3_utilization_percentage"] == 100
    assert metrics["system/node-a/gpu_3_memory_usage_megabytes"] == 40_000
    assert metrics["system/node-a/gpu_3_memory_usage_percentage"] == 50
    assert metrics["system/node-a/gpu_3_power_usage_watts"] == 412.5
    assert metrics["system/node-a/gpu_3_temperature_celsius"] == 71
    assert metrics["system/node-a/gpu_3_sm_clock_mhz"] == 1755
    assert set(history(client, run_id, "system/node-a/gpu_1_utilization_percentage")) == {20, 80}
    readings = history(client, run_id, "system/node-a/gpu_1_utilization_percentage") + \
        history(client, run_id, "system/node-a/gpu_3_utilization_percentage")
    assert summary["summary/node-a/gpu_utilization_mean_percentage"] == pytest.approx(sum(readings) / len(readings))
    assert summary["summary/node-a/gpu_utilization_max_percentage"] == 100
    assert not nvml.initialized  # shut down with the sampler


def test_an_unsupported_gpu_reading_is_reported_once_and_the_rest_goes_on(tracking_uri, run):
    client, run_id = run
    nvml = FakeNvml([FakeGpu("GPU-a"), FakeGpu("GPU-b")], unsupported={"power"})
    (summary,) = run_for(sampler(tracking_uri, run_id, "node-a", nvml, gpus=["GPU-a", "GPU-b"]))
    metrics = client.get_run(run_id).data.metrics
    assert nvml.calls["power"] == 2  # asked once per GPU, then never again
    assert nvml.calls["utilization"] >= 6
    assert not [k for k in metrics if "power" in k]
    assert "system/node-a/gpu_1_temperature_celsius" in metrics
    problem = client.get_run(run_id).data.tags["orch.system_metrics.problem.node-a"]
    assert problem.count("power failed") == 1 and "Not Supported" in problem  # once, not once per GPU


def test_without_nvml_the_host_metrics_still_flow(tracking_uri, run):
    client, run_id = run
    run_for(sampler(tracking_uri, run_id, "node-a", FakeNvml([FakeGpu("GPU-a")], fail_init=True), gpus=["GPU-a"]))
    metrics = client.get_run(run_id).data.metrics
    assert "system/node-a/cpu_utilization_percentage" in metrics
    assert not [k for k in metrics if "gpu" in k]
    assert "Driver Not Loaded" in client.get_run(run_id).data.tags["orch.system_metrics.problem.node-a"]


def test_a_broken_host_reading_never_raises_and_is_reported_once(tracking_uri, run, monkeypatch):
    client, run_id = run
    calls = []

    def broken():
        calls.append(1)
        raise OSError("no /proc/meminfo")

    monkeypatch.setattr(psutil, "virtual_memory", broken)
    s = sampler(tracking_uri, run_id, "node-a")
    run_for(s)
    assert len(calls) >= 3 and not s._thread.is_alive()  # it kept trying, and stopped when told
    assert client.get_run(run_id).data.tags["orch.system_metrics.problem.node-a"].count("no /proc/meminfo") == 1
    metrics = client.get_run(run_id).data.metrics
    assert "system/node-a/cpu_utilization_percentage" in metrics  # the other readings went on
    assert "system/node-a/system_memory_usage_megabytes" not in metrics


def test_sampling_starts_before_mlflow_answers_and_keeps_the_runs_steps(tracking_uri, run):
    """A worker's first MLflow call imports MLflow (seconds on a busy small machine): samples taken meanwhile are
    kept and sent once the run's start time is known, numbered from it, so a short job is still sampled."""
    from orchestrator.tracking.sender import MetricSender
    from orchestrator.tracking.system import SystemSampler

    client, run_id = run
    started = client.get_run(run_id).info.start_time / 1000

    answered = []

    def slow_run_id():  # the id arrives 0.8 s late, as from the progress board while MLflow imports
        time.sleep(0.8)
        answered.append(time.time())
        return run_id

    s = SystemSampler(MetricSender(tracking_uri, slow_run_id, interval_s=0.2), "slow", 0.1, nvml_loader=_no_nvml)
    sampler_started = time.time()
    s.start()
    time.sleep(1.4)
    s.stop()
    steps = [m.step for m in client.get_metric_history(run_id, "system/slow/cpu_utilization_percentage")]
    assert steps == sorted(set(steps)), steps
    # Numbered from the run's start (before this sampler existed), and sampled before MLflow answered.
    assert int((sampler_started - started) / 0.1) <= steps[0] < int((answered[0] - started) / 0.1), (steps, answered)


def test_two_nodes_sampling_into_one_run_do_not_collide(tracking_uri, run):
    client, run_id = run
    a = sampler(tracking_uri, run_id, "node-a", FakeNvml([FakeGpu("GPU-a", utilization=[10])]), gpus=["GPU-a"])
    b = sampler(tracking_uri, run_id, "node-b", FakeNvml([FakeGpu("GPU-b", utilization=[90])]), gpus=["GPU-b"])
    run_for(a, b)
    metrics = client.get_run(run_id).data.metrics
    for node, value in (("node-a", 10), ("node-b", 90)):
        values = history(client, run_id, f"system/{node}/gpu_0_utilization_percentage")
        assert len(values) >= 3 and set(values) == {value}
        assert metrics[f"summary/{node}/gpu_utilization_mean_percentage"] == value
        assert f"system/{node}/cpu_utilization_percentage" in metrics
    assert {k.split("/")[1] for k in metrics if k.startswith("system/")} == {"node-a", "node-b"}


def test_node_labels_tell_apart_hosts_that_share_a_name():
    from orchestrator.tracking.nodes import node_label
    from orchestrator.tracking.system import safe_label

    everyone = [{"host": "worker", "node_key": "aaaaaaaa1111"}, {"host": "worker", "node_key": "bbbbbbbb2222"},
                {"host": "gpu-7.example.com", "node_key": "cccc"}]
    assert [node_label(p, everyone) for p in everyone] == ["worker-aaaaaaaa", "worker-bbbbbbbb", "gpu-7.example.com"]
    assert safe_label("a/b:c d") == "a_b_c d"


# -- MFU and stragglers --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, family", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200"), ("NVIDIA H200 NVL", "H200 NVL"), ("NVIDIA GH200 480GB", "GH200"),
    ("NVIDIA A100-SXM4-80GB", "A100"), ("NVIDIA A100-PCIE-40GB", "A100"), ("NVIDIA A10G", "A10G"),
    ("NVIDIA A10", "A10"), ("NVIDIA L4", "L4"), ("NVIDIA L40S", "L40S"), ("NVIDIA L40", "L40"),
    ("Tesla V100-SXM2-16GB", "V100 SXM"), ("Tesla V100-PCIE-32GB", "V100 PCIe"), ("Tesla T4", "T4"),
    ("AMD Instinct MI300X", "MI300X"), ("NVIDIA GeForce RTX 4090", None), ("cpu", None), (None, None),
])
def test_device_names_map_to_their_row(name, family):
    from orchestrator.tracking.mfu import device_family

    assert device_family(name) == family


def test_peak_flops_by_precision_and_unknowns():
    from orchestrator.tracking.mfu import peak_flops

    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16-mixed") == pytest.approx(989.4e12)
    assert peak_flops("NVIDIA A100-SXM4-80GB", "32-true") == pytest.approx(19.5e12)
    assert peak_flops("NVIDIA A100-SXM4-80GB", "32-true", "high") == pytest.approx(156e12)  # TF32 allowed
    assert peak_flops("NVIDIA L4", "16-mixed") == pytest.approx(121e12)
    assert peak_flops("Tesla T4", "bf16-mixed") is None  # emulated there: no honest peak
    assert peak_flops("Some Future Accelerator", "bf16-mixed") is None
    assert peak_flops(None, "32-true") is None


def test_stragglers_exceed_1_2x_the_median():
    from orchestrator.tracking.throughput import describe_stragglers, find_stragglers

    assert find_stragglers({0: 1.0, 1: 1.1, 2: 1.0, 3: 1.3}) == {3: pytest.approx(1.3 / 1.05)}  # median 1.05
    assert find_stragglers({0: 1.0, 1: 1.19}) == {}
    assert find_stragglers({0: 5.0}) == {}
    assert describe_stragglers({}) == "none"
    assert describe_stragglers({3: 1.3}) == "rank 3 (1.30x the median)"


# -- throughput in a real Lightning run ----------------------------------------------------------------------------
def fit_tiny_lm(tracking_uri, run_id, model, monitor, steps=40):
    from tiny_lm import RandomTokens

    from orchestrator.tracking.logger import MLflowRunLogger

    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, log_every_n_steps=2, limit_val_batches=0,
                         logger=MLflowRunLogger(tracking_uri, run_id), callbacks=[monitor, FinalCommit()],
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(model, datamodule=RandomTokens(n=256, batch_size=16))
    return trainer


class FinalCommit(pl.Callback):
    """Without Ray, what the final committed checkpoint does for rank 0's held-back metrics (tracking/gate.py)."""

    def on_train_end(self, trainer, pl_module):  # after the monitor's summary, as in a worker
        from orchestrator.tracking.gate import EVERYTHING

        trainer.logger.gate.commit(EVERYTHING)


def test_throughput_on_a_cpu_counts_flops_logs_tokens_and_leaves_mfu_absent(tracking_uri, run, monkeypatch):
    import orchestrator.tracking.throughput as throughput
    from tiny_lm import TinyLM, TinyLMWithFormula

    monkeypatch.setattr(throughput, "MIN_WINDOW_S", 0.0)  # a live window at every log step of this short run
    client, run_id = run
    monitor = throughput.ThroughputMonitor(tracking_uri, run_id)
    fit_tiny_lm(tracking_uri, run_id, TinyLM(sleep_s=0.01, slow_rank=0), monitor)
    data = client.get_run(run_id).data
    metrics = data.metrics
    # Counted with torch's FlopCounterMode on the first real step: the 6N + attention formula, give or take
    # the scores flash attention recomputes in backward.
    formula = TinyLMWithFormula().flops_per_sample()
    assert formula <= metrics["summary/flops_per_sample"] <= 1.05 * formula
    assert data.tags["orch.flops_per_sample_source"] == "flop_counter"
    assert not [k for k in metrics if "mfu" in k], "a CPU has no known peak: MFU must be absent, not zero"
    assert data.tags["orch.devices"] == "1 x cpu" and data.tags["orch.stragglers"] == "none"
    step_times = history(client, run_id, "perf/step_time_s")
    assert len(step_times) >= 10 and all(0.01 < t < 5 for t in step_times)  # each step sleeps 10 ms
    samples = history(client, run_id, "perf/samples_per_s")
    tokens = history(client, run_id, "perf/tokens_per_s")
    assert tokens == pytest.approx([s * 32 for s in samples])  # tokens_per_sample = seq_len
    assert all(0 <= f < 1 for f in history(client, run_id, "perf/data_wait_fraction"))
    # 40 steps over three epochs of 16: each epoch's first step is not timed (the very first is the counted one).
    assert metrics["summary/samples_per_s"] == metrics["summary/rank_0/samples_per_s"]  # one rank
    assert 0 < metrics["summary/samples_per_s"] < 16 / 0.01  # each step of 16 samples sleeps 10 ms
    assert metrics["summary/tokens_per_s"] == pytest.approx(metrics["summary/samples_per_s"] * 32)
    assert metrics["summary/rank_0/step_time_p95_s"] >= metrics["summary/rank_0/step_time_median_s"] > 0.01
    assert 0 < metrics["summary/rank_0/work_time_median_s"] < metrics["summary/rank_0/step_time_median_s"]
    assert metrics["summary/rank_0/peak_rss_megabytes"] > 30
    assert 0 < metrics["summary/device_hours"] < 0.1
    assert metrics["summary/stragglers"] == 0
    assert len(monitor.step_times) == 37


def test_mfu_on_a_known_device_with_the_recipe_formula(tracking_uri, run, monkeypatch):
    import orchestrator.tracking.throughput as throughput
    from tiny_lm import TinyLMWithFormula

    monkeypatch.setattr(throughput, "MIN_WINDOW_S", 0.0)

    class OnAnH100(throughput.ThroughputMonitor):  # the device's name is the seam; the timing is real
        def device_name(self, trainer):
            return "NVIDIA H100 80GB HBM3"

    client, run_id = run
    model = TinyLMWithFormula()
    fit_tiny_lm(tracking_uri, run_id, model, OnAnH100(tracking_uri, run_id), steps=20)
    data = client.get_run(run_id).data
    metrics = data.metrics
    assert data.tags["orch.flops_per_sample_source"] == "recipe"
    assert metrics["summary/flops_per_sample"] == model.flops_per_sample()
    expected = model.flops_per_sample() * metrics["summary/samples_per_s"] / 67e12  # fp32 peak of an H100 SXM
    assert metrics["summary/mfu"] == pytest.approx(expected)
    assert 0 < metrics["perf/mfu"] < 1
    assert data.tags["orch.devices"] == "1 x NVIDIA H100 80GB HBM3"


def test_a_flop_formula_that_raises_falls_back_to_counting():
    from orchestrator.tracking.mfu import recipe_flops_per_sample

    class Broken:
        def flops_per_sample(self):
            raise ZeroDivisionError

    class Formula:
        def flops_per_sample(self):
            return 1e9

    assert recipe_flops_per_sample(Broken()) is None
    assert recipe_flops_per_sample(Formula()) == 1e9
    assert recipe_flops_per_sample(object()) is None


def test_tracking_switches_pick_the_callbacks():
    from orchestrator.spec import TrackingSpec
    from orchestrator.tracking.nodes import SystemMetricsCallback
    from orchestrator.tracking.throughput import ThroughputMonitor, telemetry_callbacks

    (both,) = telemetry_callbacks(TrackingSpec(), "sqlite:///x.db", "run")
    assert isinstance(both, ThroughputMonitor) and both.node_sampling.interval_s == 5.0
    (alone,) = telemetry_callbacks(TrackingSpec(throughput=False), "sqlite:///x.db", "run")
    assert isinstance(alone, SystemMetricsCallback)
    (no_sampler,) = telemetry_callbacks(TrackingSpec(system_metrics=False), "sqlite:///x.db", "run")
    assert no_sampler.node_sampling is None
    assert telemetry_callbacks(TrackingSpec(throughput=False, system_metrics=False), "sqlite:///x.db", "run") == []


# -- a real GPU, where there is one --------------------------------------------------------------------------------
@pytest.mark.gpu
def test_real_nvml_on_this_gpu(tracking_uri, run):
    import torch

    from orchestrator.tracking.mfu import device_family

    client, run_id = run
    uuid = str(torch.cuda.get_device_properties(0).uuid)
    uuid = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
    from orchestrator.tracking.sender import MetricSender
    from orchestrator.tracking.system import SystemSampler

    busy = threading.Event()

    def load():  # keep the GPU busy so utilization and power move
        x = torch.randn(4096, 4096, device="cuda")
        while not busy.is_set():
            x = x @ x
            x = x / x.norm()
        torch.cuda.synchronize()

    worker = threading.Thread(target=load)
    worker.start()
    try:
        s = SystemSampler(MetricSender(tracking_uri, run_id, interval_s=0.2), "gpu-node", 0.2, gpus=[uuid])
        (summary,) = run_for(s, seconds=2.0)
    finally:
        busy.set()
        worker.join()
    metrics = client.get_run(run_id).data.metrics
    index = [k for k in metrics if k.endswith("_utilization_percentage") and "/gpu_" in k]
    assert index, metrics
    prefix = index[0].rsplit("_utilization_percentage", 1)[0]
    assert 0 <= metrics[f"{prefix}_utilization_percentage"] <= 100
    assert 0 < metrics[f"{prefix}_memory_usage_megabytes"]
    assert 0 < metrics[f"{prefix}_temperature_celsius"] < 120
    assert 0 < metrics[f"{prefix}_sm_clock_mhz"] < 5000
    assert summary["summary/gpu-node/gpu_utilization_max_percentage"] > 0
    print("device row:", device_family(torch.cuda.get_device_name(0)))


def test_a_sampling_interval_below_a_tenth_of_a_second_is_refused():
    from orchestrator.errors import SpecError
    from orchestrator.loader import load_spec

    with pytest.raises(SpecError) as caught:
        load_spec(ASSETS / "telemetry_project/job.yaml", ["tracking.system_metrics_interval=0.01"])
    (problem,) = caught.value.problems
    assert problem.field == "tracking.system_metrics_interval"
    assert "0.1" in problem.message and "0.01" in problem.render()
    assert load_spec(ASSETS / "telemetry_project/job.yaml", ["tracking.throughput=false"]).tracking.throughput is False


def test_two_drivers_opening_a_new_experiment_at_once_share_it(existing_store, monkeypatch):
    """A user's sweep starts drivers side by side on a fresh experiment: each finds it missing, both create it;
    the second create fails in the store (a unique name), and that driver must take the first one's experiment."""
    from mlflow import MlflowClient

    from orchestrator.tracking.run import RunRecord

    other_driver = MlflowClient(existing_store)
    real_lookup = MlflowClient.get_experiment_by_name
    lookups = []

    def lookup_racing_the_other_driver(self, name):
        lookups.append(name)
        if len(lookups) == 1:  # missing when we look; the other driver creates it before our create
            other_driver.create_experiment(name)
            return None
        return real_lookup(self, name)

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", lookup_racing_the_other_driver)
    record = RunRecord(existing_store, "sweep", None, {})
    assert record.experiment_id == real_lookup(other_driver, "sweep").experiment_id
    assert other_driver.get_run(record.run_id).info.experiment_id == record.experiment_id
