"""py_spawn RSS_BYTES N BUDGET_SECS: touches RSS_BYTES, then times up to N
subprocess.run(["/bin/true"]) calls, stopping after BUDGET_SECS.
Prints "median_ns count"."""
import subprocess
import sys
import time

rss, n, budget = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
ballast = bytearray(rss)
if rss:
    ballast[::4096] = b"\x01" * len(range(0, rss, 4096))
times, spent = [], 0.0
while len(times) < n and spent < budget:
    start = time.perf_counter_ns()
    subprocess.run(["/bin/true"], check=True)
    took = time.perf_counter_ns() - start
    spent += took / 1e9
    times.append(took)
times.sort()
print(times[len(times) // 2], len(times))
