"""Hardware, throughput and stragglers of a real `orch submit`: the CLI, the session's Ray cluster, a real MLflow store."""

from __future__ import annotations

import shutil

import psutil
import pytest

from conftest import ASSETS, only_run, run_orch

pytestmark = pytest.mark.slow


def test_a_cpu_run_records_hardware_throughput_and_its_straggler(cluster_env, tracking_uri, tmp_path):
    project = tmp_path / "telemetry_project"
    shutil.copytree(ASSETS / "telemetry_project", project)
    # tiny_lm.TinyLM on 2 workers; rank 1 sleeps 50 ms in every forward pass; hardware sampled every 0.5 s.
    result = run_orch(["submit", "job.yaml", f"checkpoint.storage_path={tmp_path}/ckpt"],
                      env=cluster_env, cwd=project, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    client, run = only_run(tracking_uri, "telemetry")
    run_id, metrics, tags = run.info.run_id, run.data.metrics, run.data.tags

    def series(key):
        return [m.value for m in client.get_metric_history(run_id, key)]

    # One sampler per node, named after the host: both workers share this machine, so exactly one node.
    (host,) = tags["orch.hostnames"].split(",")
    nodes = {key.split("/")[1] for key in metrics if key.startswith("system/")}
    assert nodes == {host}
    node = f"system/{host}"
    total_mb = psutil.virtual_memory().total / 1e6
    cpu = series(f"{node}/cpu_utilization_percentage")
    assert len(cpu) >= 2 and all(0 <= v <= 100 for v in cpu)
    assert all(0 < v <= total_mb for v in series(f"{node}/system_memory_usage_megabytes"))
    assert all(0 < v <= 100 for v in series(f"{node}/system_memory_usage_percentage"))
    # Both training processes (torch, Lightning, Ray loaded: hundreds of MB each), not the whole machine.
    rss = series(f"{node}/training_processes_rss_megabytes")
    assert all(300 < v < total_mb for v in rss), rss
    for key in metrics:
        if key.startswith(node) and key.endswith("_per_s"):
            assert all(v >= 0 for v in series(key)), key
    assert not [key for key in metrics if "/gpu_" in key]  # a CPU job touches no GPU
    assert 0 <= metrics[f"summary/{host}/cpu_utilization_mean_percentage"] <= 100

    # Throughput: rank 0's live figures, and the summary of both ranks.
    samples, tokens = series("perf/samples_per_s"), series("perf/tokens_per_s")
    assert samples and tokens == pytest.approx([s * 32 for s in samples])
    assert metrics["summary/tokens_per_s"] == pytest.approx(metrics["summary/samples_per_s"] * 32)
    assert metrics["summary/samples_per_s"] == pytest.approx(
        metrics["summary/rank_0/samples_per_s"] + metrics["summary/rank_1/samples_per_s"])
    for rank in (0, 1):
        figures = {k.rsplit("/", 1)[1]: v for k, v in metrics.items() if k.startswith(f"summary/rank_{rank}/")}
        assert figures["step_time_p95_s"] >= figures["step_time_median_s"] > 0
        assert 0 <= figures["data_wait_fraction"] < 1
        assert figures["peak_rss_megabytes"] > 300
    assert metrics["summary/flops_per_sample"] > 0 and tags["orch.flops_per_sample_source"] == "flop_counter"
    assert not [key for key in metrics if "mfu" in key]  # no peak FLOP/s is known for a CPU
    assert metrics["summary/device_hours"] > 0 and tags["orch.devices"] == "2 x cpu"

    # DDP makes both ranks' steps equally long; rank 1's time outside backward gives it away.
    assert metrics["summary/rank_1/work_time_median_s"] > 0.05
    assert metrics["summary/stragglers"] == 1 and tags["orch.stragglers"].startswith("rank 1 (")

    # The terminal summary says the same.
    for fragment in ("hardware and throughput", "samples/s", "tokens/s", "MFU not known", "step time",
                     f"node {host}", "device-hours", "stragglers", "rank 1 ("):
        assert fragment in output, f"{fragment!r} missing from:\n{output}"
