"""Pure-Python scheduling for frugal: requests, the continuous-batching scheduler,
the KV block pool with prefix caching, and the priority / fair-share policy.

No torch import anywhere in this package, so it is tested in microseconds and can
drive another engine's model runner.
"""
from scheduler.block_pool import BlockPool, FreeBlockQueue, KVBlock
from scheduler.config import SchedulerConfig, num_blocks_from_memory
from scheduler.kv_cache_manager import KVCacheManager
from scheduler.output import ModelRunnerOutput, ScheduledSeq, SchedulerOutput
from scheduler.policy import FairSharePolicy, WaitingQueue
from scheduler.request import Priority, Request, RequestStatus
from scheduler.scheduler import QueueFullError, Scheduler

__all__ = [
    "BlockPool",
    "FairSharePolicy",
    "FreeBlockQueue",
    "KVBlock",
    "KVCacheManager",
    "ModelRunnerOutput",
    "Priority",
    "QueueFullError",
    "Request",
    "RequestStatus",
    "ScheduledSeq",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "WaitingQueue",
    "num_blocks_from_memory",
]
