"""GPU gauges from NVML (nvidia-ml-py, imported as `pynvml`): utilisation, memory and power per device.

Without an NVIDIA driver (a CPU node) NVML does not initialise and the collector yields nothing: the metrics
are absent, never an error. A device query that fails at scrape time drops that device's sample, not the scrape.
"""
from __future__ import annotations

import logging

from prometheus_client.core import GaugeMetricFamily

from serving.metrics import names

logger = logging.getLogger(__name__)


class GpuCollector:
    def __init__(self):
        self.nvml = None
        self.handles: list = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self.nvml = pynvml
        except Exception as e:  # no driver, no library, no device: nothing to report
            logger.debug("no GPU metrics: %s", e)
        else:
            logger.info("GPU metrics for %d devices", len(self.handles))

    @property
    def available(self) -> bool:
        return self.nvml is not None and bool(self.handles)

    def describe(self):
        return []

    def collect(self):
        if not self.available:
            return
        nvml = self.nvml
        util = GaugeMetricFamily(names.GPU_UTILIZATION_PERC, "GPU utilisation over the last sample period, 0-1.",
                                 labels=["gpu"])
        used = GaugeMetricFamily(names.GPU_MEMORY_USED_BYTES, "GPU memory in use, bytes.", labels=["gpu"])
        total = GaugeMetricFamily(names.GPU_MEMORY_TOTAL_BYTES, "GPU memory in all, bytes.", labels=["gpu"])
        power = GaugeMetricFamily(names.GPU_POWER_WATTS, "GPU power draw, watts.", labels=["gpu"])
        for index, handle in enumerate(self.handles):
            gpu = [str(index)]
            try:
                util.add_metric(gpu, nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                used.add_metric(gpu, float(memory.used))
                total.add_metric(gpu, float(memory.total))
                power.add_metric(gpu, nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0)
            except Exception as e:  # NOTE: some devices (MIG slices, old boards) lack a counter; skip, keep the rest
                logger.debug("GPU %d: %s", index, e)
        yield from (util, used, total, power)
