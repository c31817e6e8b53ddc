"""One hardware sampler per node: CPU, memory, disk, network and the job's GPUs (NVML), into the job's MLflow run.

Why not MLflow's own `SystemMetricsMonitor(node_id=...)`, which we evaluated first:
- it samples every GPU NVML sees, not the ones the job uses, and has no temperature, SM clock or the training
  processes' memory;
- it asks the server for the run on every sample and stops for good on the first failed send, so a tracking
  server's hiccup ends hardware sampling for the rest of the run, and it warns on every failed GPU read;
- `MLFLOW_SYSTEM_METRICS_NODE_ID` in the environment overrides `node_id`, so one variable set cluster-wide makes
  every node write the same keys.
We keep its names (`system/<node>/cpu_utilization_percentage`, `.../gpu_0_utilization_percentage`, ...) so the
MLflow UI's "System metrics" tab and anyone used to MLflow's names read them the same way.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from typing import Any, Callable

log = logging.getLogger(__name__)

MB = 1e6


def load_nvml():
    """The seam tests replace: the `pynvml` module from nvidia-ml-py."""
    import pynvml

    return pynvml


def safe_label(text: str) -> str:
    """A name MLflow accepts inside a metric key (letters, digits, _ - . and space)."""
    return re.sub(r"[^A-Za-z0-9_.\- ]", "_", text) or "node"


class SystemSampler:
    """Samples the host every `interval_s` on a daemon thread and hands the values to a batching sender.

    Every failure is caught: the first of each kind is logged and recorded on the run as a tag, and sampling goes
    on with what still works. Training never waits on it.
    """

    def __init__(self, sender, node: str, interval_s: float, pids: list[int] | None = None,
                 gpus: list[str | int] | None = None, nvml_loader: Callable[[], Any] = load_nvml,
                 disk_path: str = "/"):
        self.sender = sender
        self.node = safe_label(node)
        self.prefix = f"system/{self.node}/"
        self.interval_s = interval_s
        self.pids = list(pids or [os.getpid()])
        self.gpus = list(gpus or [])
        self.nvml_loader = nvml_loader
        self.disk_path = disk_path
        self.problems: list[str] = []
        self._seen_problems: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._run_start = time.time()  # until the run's own start time is known (_look_up_run_start)
        self._run_start_known = threading.Event()
        self._early: list[tuple[float, dict[str, float]]] = []  # samples taken before it was known
        self._early_lock = threading.Lock()
        self._last_tick = 0.0
        self._last_step = 0
        self._processes: list = []
        self._counters: dict[str, tuple[float, float]] = {}
        self._nvml = None
        self._handles: list[tuple[int, Any]] = []
        self._unsupported: set[tuple[int, str]] = set()
        self._cpu = [0.0, 0]  # sum, count
        self._gpu_util = [0.0, 0, 0.0]  # sum, count, max

    # -- lifecycle --------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"orch-system-sampler-{self.node}", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> dict[str, float]:
        """Stop sampling, log this node's summary, send what is buffered; returns the summary."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 2 * self.interval_s))
        deadline = time.monotonic() + timeout_s  # the run's start and the last sends share the time given
        self._run_start_known.wait(timeout=timeout_s)
        self._send_early()
        summary = self.summary()
        try:
            if summary:
                self.sender.add(summary, self._last_step)
            self.sender.close(timeout_s=max(1.0, deadline - time.monotonic()))
        except Exception as exc:
            self._problem("send", exc)
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
        return summary

    def _run(self) -> None:
        try:
            self._begin()
        except Exception as exc:
            self._problem("start", exc)
        while not self._stop.wait(self.interval_s):
            self._tick()
        if time.monotonic() - self._last_tick >= self.interval_s / 4:
            self._tick()  # the last stretch before the stop, unless it is too short to mean anything

    def _tick(self) -> None:
        try:
            metrics = self.sample()
            sampled_at = time.time()
            if not self._run_start_known.is_set():
                with self._early_lock:
                    self._early.append((sampled_at, metrics))
                return
            self._send_early()
            self._add(sampled_at, metrics)
        except Exception as exc:  # whatever it is, the thread goes on to the next sample
            self._problem("sample", exc)

    def _add(self, sampled_at: float, metrics: dict[str, float]) -> None:
        self._last_step = int((sampled_at - self._run_start) / self.interval_s)
        self.sender.add({self.prefix + k: v for k, v in metrics.items()}, self._last_step)

    def _send_early(self) -> None:
        with self._early_lock:
            early, self._early = self._early, []
        for sampled_at, metrics in early:
            self._add(sampled_at, metrics)

    def _look_up_run_start(self) -> None:
        """Steps count samples from the run's start, so nodes line up and a restarted worker goes on. Asked from a
        thread of its own: it waits for the driver to open the run (and, without a relay, the first MLflow call
        imports MLflow, seconds on a busy small machine); sampling must not wait, or a short job is never sampled."""
        try:
            self._run_start = self.sender.run_start_s()
        except Exception as exc:  # the sampler's own start time stands in
            self._problem("run start time", exc)
        finally:
            self._run_start_known.set()

    def _begin(self) -> None:
        threading.Thread(target=self._look_up_run_start, name=f"orch-system-start-{self.node}", daemon=True).start()
        import psutil

        for pid in self.pids:
            try:
                self._processes.append(psutil.Process(pid))
            except psutil.Error as exc:
                self._problem("process", exc)
        # The first readings of cumulative counters only set the baseline for the next.
        for kind, prime in (("cpu", lambda: psutil.cpu_percent(None)),
                            ("disk and network counters", lambda: self._rates({}))):
            try:
                prime()
            except Exception as exc:
                self._problem(kind, exc)
        if self.gpus:
            self._open_gpus()
        self._last_tick = time.monotonic()

    # -- sampling ---------------------------------------------------------------------------------------------
    def sample(self) -> dict[str, float]:
        """One reading of everything; a reading that fails is reported once and the others still count."""
        metrics: dict[str, float] = {}
        for kind, read in (("cpu", self._cpu_reading), ("memory", self._memory_reading),
                           ("process memory", self._process_reading), ("disk usage", self._disk_reading),
                           ("disk and network counters", self._rates)):
            try:
                read(metrics)
            except Exception as exc:
                self._problem(kind, exc)
        if self._handles:
            metrics.update(self._sample_gpus())
        self._last_tick = time.monotonic()
        return metrics

    def _cpu_reading(self, metrics: dict[str, float]) -> None:
        import psutil

        cpu = psutil.cpu_percent(None)  # across all cores since the previous call
        metrics["cpu_utilization_percentage"] = cpu
        self._cpu[0] += cpu
        self._cpu[1] += 1

    def _memory_reading(self, metrics: dict[str, float]) -> None:
        import psutil

        memory = psutil.virtual_memory()
        metrics["system_memory_usage_megabytes"] = memory.used / MB
        metrics["system_memory_usage_percentage"] = memory.used / memory.total * 100

    def _process_reading(self, metrics: dict[str, float]) -> None:
        import psutil

        rss = 0
        for process in list(self._processes):
            try:
                rss += process.memory_info().rss
            except psutil.Error:  # a worker that exited; the others still count
                self._processes.remove(process)
        if self._processes:
            metrics["training_processes_rss_megabytes"] = rss / MB

    def _disk_reading(self, metrics: dict[str, float]) -> None:
        import psutil

        metrics["disk_usage_percentage"] = psutil.disk_usage(self.disk_path).percent

    def _rates(self, metrics: dict[str, float]) -> None:
        """Disk and network throughput in MB/s since the previous sample (the counters are cumulative)."""
        import psutil

        now = time.monotonic()
        counters: dict[str, float] = {}
        disk = psutil.disk_io_counters()
        if disk is not None:  # None in some containers
            counters["disk_read_megabytes_per_s"] = disk.read_bytes
            counters["disk_write_megabytes_per_s"] = disk.write_bytes
        # Loopback is left out: it is traffic between processes of this node, not over the network.
        nics = [nic for name, nic in (psutil.net_io_counters(pernic=True) or {}).items() if not name.startswith("lo")]
        if nics:
            counters["network_receive_megabytes_per_s"] = sum(nic.bytes_recv for nic in nics)
            counters["network_transmit_megabytes_per_s"] = sum(nic.bytes_sent for nic in nics)
        for name, value in counters.items():
            before = self._counters.get(name)
            if before is not None and now > before[0]:
                metrics[name] = max(0.0, value - before[1]) / (now - before[0]) / MB
            self._counters[name] = (now, value)

    def _open_gpus(self) -> None:
        try:
            nvml = self.nvml_loader()
            nvml.nvmlInit()
        except Exception as exc:
            self._problem("NVML", exc)
            return
        self._nvml = nvml
        for gpu in self.gpus:
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(gpu) if isinstance(gpu, int) else \
                    nvml.nvmlDeviceGetHandleByUUID(gpu)
                self._handles.append((int(nvml.nvmlDeviceGetIndex(handle)), handle))
            except Exception as exc:
                self._problem(f"GPU {gpu}", exc)
        self._handles.sort(key=lambda item: item[0])

    def _sample_gpus(self) -> dict[str, float]:
        nvml = self._nvml
        metrics: dict[str, float] = {}
        readers = {
            "utilization": lambda h: {"utilization_percentage": nvml.nvmlDeviceGetUtilizationRates(h).gpu},
            "memory": lambda h: _memory(nvml.nvmlDeviceGetMemoryInfo(h)),
            "power": lambda h: {"power_usage_watts": nvml.nvmlDeviceGetPowerUsage(h) / 1000},
            "temperature": lambda h: {"temperature_celsius": nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU)},
            "sm_clock": lambda h: {"sm_clock_mhz": nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM)},
        }
        for index, handle in self._handles:
            for kind, read in readers.items():
                if (index, kind) in self._unsupported:
                    continue
                try:
                    values = read(handle)
                except Exception as exc:  # e.g. power is not exposed on some virtual GPUs: stop asking
                    self._unsupported.add((index, kind))
                    self._problem(f"GPU {index} {kind}", exc)
                    continue
                metrics.update({f"gpu_{index}_{name}": float(value) for name, value in values.items()})
            utilization = metrics.get(f"gpu_{index}_utilization_percentage")
            if utilization is not None:
                self._gpu_util[0] += utilization
                self._gpu_util[1] += 1
                self._gpu_util[2] = max(self._gpu_util[2], utilization)
        return metrics

    def summary(self) -> dict[str, float]:
        """This node's figures for the whole run, under summary/<node>/."""
        out: dict[str, float] = {}
        if self._cpu[1]:
            out["cpu_utilization_mean_percentage"] = self._cpu[0] / self._cpu[1]
        if self._gpu_util[1]:
            out["gpu_utilization_mean_percentage"] = self._gpu_util[0] / self._gpu_util[1]
            out["gpu_utilization_max_percentage"] = self._gpu_util[2]
        return {f"summary/{self.node}/{k}": v for k, v in out.items()}

    def _problem(self, what: str, exc: BaseException) -> None:
        """Each kind of failure is reported once, in the worker's log and as a tag on the run."""
        kind = what.split(" ")[-1] if what.startswith("GPU") else what
        if kind in self._seen_problems:
            return
        self._seen_problems.add(kind)
        message = f"system metrics on {self.node}: {what} failed ({type(exc).__name__}: {exc}); the rest goes on"
        self.problems.append(message)
        log.warning(message)
        try:  # with the samples, by their route (through the driver in a job)
            self.sender.set_tags({f"orch.system_metrics.problem.{self.node}"[:250]: "; ".join(self.problems)[:5000]})
        except Exception:
            pass


def _memory(info) -> dict[str, float]:
    return {"memory_usage_megabytes": info.used / MB, "memory_usage_percentage": info.used / info.total * 100}
