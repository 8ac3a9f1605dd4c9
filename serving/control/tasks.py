"""Agent budgets per task id: model calls, tool calls and wall time since the task's first call.

A task's token limit is an ordinary budget line (scope task, period total; see ControlPlane), so it is reserved
and settled like any other. What is counted here is what a budget of money or tokens cannot express: how many
model calls the task made, how many tool calls its agent reported, and how long it has been running. A task is
known from its first model call; reporting tool calls or an outcome for a task that never made one is an error.
State starts from the ledger (a task seen for the first time in this process is seeded with its past calls) and
lives in this process or in Redis.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from serving.control.config import TaskLimits
from serving.control.errors import BudgetExceeded, TaskNotFound
from serving.control.ratelimit import LUA_NOW


@dataclass(slots=True)
class TaskState:
    calls: int = 0  # model calls admitted
    tool_calls: int = 0  # tool calls reported
    first_ts: float | None = None  # UNIX seconds of the first call


TaskSeeder = Callable[[str, str], Awaitable[TaskState]]  # (tenant, task) -> what the ledger holds


def _wall_refusal(task: str, limits: TaskLimits, running_s: float) -> BudgetExceeded:
    return BudgetExceeded(f"budget_exceeded: task {task!r}: max_wall_s {limits.max_wall_s:g} s since its first "
                          f"call (running {running_s:.0f} s)")


def _calls_refusal(task: str, limits: TaskLimits, calls: int) -> BudgetExceeded:
    return BudgetExceeded(f"budget_exceeded: task {task!r}: max_calls {limits.max_calls} model calls "
                          f"({calls} made)")


def _tools_refusal(task: str, limits: TaskLimits, tool_calls: int, count: int) -> BudgetExceeded:
    return BudgetExceeded(f"budget_exceeded: task {task!r}: max_tool_calls {limits.max_tool_calls} tool calls "
                          f"({tool_calls} reported, {count} more asked for)")


class LocalTasks:
    def __init__(self, limits: TaskLimits, seeder: TaskSeeder):
        self.limits = limits
        self.seeder = seeder
        self._tasks: dict[tuple[str, str], TaskState] = {}
        self._lock = threading.Lock()

    async def _state(self, tenant: str, task: str) -> TaskState:
        key = (tenant, task)
        if key not in self._tasks:
            seeded = await self.seeder(tenant, task)
            with self._lock:
                self._tasks.setdefault(key, seeded)
        return self._tasks[key]

    async def admit_call(self, tenant: str, task: str) -> None:
        state = await self._state(tenant, task)
        limits, now = self.limits, time.time()
        with self._lock:
            if state.first_ts is not None and limits.max_wall_s is not None and now - state.first_ts > limits.max_wall_s:
                raise _wall_refusal(task, limits, now - state.first_ts)
            if limits.max_calls is not None and state.calls + 1 > limits.max_calls:
                raise _calls_refusal(task, limits, state.calls)
            state.calls += 1
            if state.first_ts is None:
                state.first_ts = now

    async def undo_call(self, tenant: str, task: str) -> None:
        """A call the engine refused does not count."""
        state = await self._state(tenant, task)
        with self._lock:
            state.calls = max(0, state.calls - 1)

    async def add_tool_calls(self, tenant: str, task: str, count: int) -> TaskState:
        state = await self._state(tenant, task)
        with self._lock:
            if state.calls == 0:
                raise TaskNotFound(f"task {task!r} is unknown: it has made no model call")
            if self.limits.max_tool_calls is not None and state.tool_calls + count > self.limits.max_tool_calls:
                raise _tools_refusal(task, self.limits, state.tool_calls, count)
            state.tool_calls += count
            return TaskState(state.calls, state.tool_calls, state.first_ts)

    async def get(self, tenant: str, task: str) -> TaskState:
        state = await self._state(tenant, task)
        with self._lock:
            return TaskState(state.calls, state.tool_calls, state.first_ts)


_PREFIX = "frugal:task:"
_TTL_S = 7 * 86400  # a task idle for a week is forgotten by Redis (the ledger still has it)

# KEYS: task. ARGV: max_calls (-1), max_wall_s (-1). {-1}: seed first; {1, running s}; {2, calls}; {0}: admitted.
_ADMIT = LUA_NOW + """
if redis.call('HEXISTS', KEYS[1], 'seeded') == 0 then return {-1} end
local first = tonumber(redis.call('HGET', KEYS[1], 'first'))
local max_calls, max_wall = tonumber(ARGV[1]), tonumber(ARGV[2])
if first and max_wall >= 0 and now - first > max_wall then return {1, tostring(now - first)} end
local calls = tonumber(redis.call('HGET', KEYS[1], 'calls')) or 0
if max_calls >= 0 and calls + 1 > max_calls then return {2, calls} end
redis.call('HINCRBY', KEYS[1], 'calls', 1)
if not first then redis.call('HSET', KEYS[1], 'first', tostring(now)) end
redis.call('EXPIRE', KEYS[1], %d)
return {0}
""" % _TTL_S

# KEYS: task. ARGV: count, max_tool_calls (-1). {-1}: seed first; {3}: unknown task; {4, tool calls}: over; {0, n}.
_TOOLS = """
if redis.call('HEXISTS', KEYS[1], 'seeded') == 0 then return {-1} end
if (tonumber(redis.call('HGET', KEYS[1], 'calls')) or 0) == 0 then return {3} end
local n, max_tools = tonumber(ARGV[1]), tonumber(ARGV[2])
local tools = tonumber(redis.call('HGET', KEYS[1], 'tools')) or 0
if max_tools >= 0 and tools + n > max_tools then return {4, tools} end
return {0, redis.call('HINCRBY', KEYS[1], 'tools', n)}
"""

_SEED = """
if redis.call('HSETNX', KEYS[1], 'seeded', '1') == 1 then
  redis.call('HINCRBY', KEYS[1], 'calls', tonumber(ARGV[1]))
  redis.call('HINCRBY', KEYS[1], 'tools', tonumber(ARGV[2]))
  if tonumber(ARGV[3]) >= 0 then redis.call('HSETNX', KEYS[1], 'first', ARGV[3]) end
  redis.call('EXPIRE', KEYS[1], %d)
end
return 0
""" % _TTL_S


class RedisTasks:
    def __init__(self, client, limits: TaskLimits, seeder: TaskSeeder):
        self.client = client
        self.limits = limits
        self.seeder = seeder
        self._admit = client.register_script(_ADMIT)
        self._tools = client.register_script(_TOOLS)
        self._seed = client.register_script(_SEED)

    @staticmethod
    def _key(tenant: str, task: str) -> str:
        return f"{_PREFIX}{tenant}:{task}"

    async def _seed_task(self, tenant: str, task: str) -> None:
        state = await self.seeder(tenant, task)
        first = -1 if state.first_ts is None else repr(state.first_ts)
        await self._seed(keys=[self._key(tenant, task)], args=[state.calls, state.tool_calls, first])

    async def admit_call(self, tenant: str, task: str) -> None:
        limits = self.limits
        args = [-1 if limits.max_calls is None else limits.max_calls,
                -1 if limits.max_wall_s is None else limits.max_wall_s]
        while True:
            result = await self._admit(keys=[self._key(tenant, task)], args=args)
            status = int(result[0])
            if status == -1:
                await self._seed_task(tenant, task)
                continue
            if status == 1:
                raise _wall_refusal(task, limits, float(result[1]))
            if status == 2:
                raise _calls_refusal(task, limits, int(result[1]))
            return

    async def undo_call(self, tenant: str, task: str) -> None:
        await self.client.hincrby(self._key(tenant, task), "calls", -1)

    async def add_tool_calls(self, tenant: str, task: str, count: int) -> TaskState:
        max_tools = -1 if self.limits.max_tool_calls is None else self.limits.max_tool_calls
        while True:
            result = await self._tools(keys=[self._key(tenant, task)], args=[count, max_tools])
            status = int(result[0])
            if status == -1:
                await self._seed_task(tenant, task)
                continue
            if status == 3:
                raise TaskNotFound(f"task {task!r} is unknown: it has made no model call")
            if status == 4:
                raise _tools_refusal(task, self.limits, int(result[1]), count)
            return await self.get(tenant, task)

    async def get(self, tenant: str, task: str) -> TaskState:
        calls, tools, first = await self.client.hmget(self._key(tenant, task), "calls", "tools", "first")
        return TaskState(int(calls or 0), int(tools or 0), float(first) if first else None)
