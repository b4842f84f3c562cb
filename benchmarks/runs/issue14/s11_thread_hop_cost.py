"""Loop-thread CPU per trip to a worker thread: anyio.to_thread.run_sync against asyncio run_in_executor, 32 concurrent callers, uvloop (issue 14, session 11)."""
import asyncio, time, anyio, anyio.to_thread, uvloop
from concurrent.futures import ThreadPoolExecutor
pool = ThreadPoolExecutor(40)
def noop(): return 1
async def main():
    loop = asyncio.get_running_loop()
    for name, call in [("anyio", lambda: anyio.to_thread.run_sync(noop)), ("executor", lambda: loop.run_in_executor(pool, noop))] * 3:
        n = 4000
        t0, c0 = time.perf_counter(), time.thread_time()
        # 32 concurrent callers, as under load
        async def caller():
            for _ in range(n // 32): await call()
        await asyncio.gather(*(caller() for _ in range(32)))
        print(f"{name}: {1e6*(time.thread_time()-c0)/n:.0f} us of loop-thread CPU per call, {1e6*(time.perf_counter()-t0)/n:.0f} us wall")
uvloop.run(main())
