"""Process pool dispatcher: a worker's next job is sent before the maps' ``done`` callbacks run."""

from __future__ import annotations

from faultkit import run_scenario

SCENARIO = r"""
import os, sys, tempfile, time
folder = tempfile.mkdtemp()
with open(os.path.join(folder, "perf_target.py"), "w") as f:
    f.write('''
import os
class Target:
    def __init__(self, folder):
        self.folder = folder
    def resolve(self):
        folder = self.folder
        def touch(x):
            open(os.path.join(folder, str(x)), "w").close()
            return x * 10
        return touch
''')
sys.path.insert(0, folder)
from perf_target import Target
from opero._map.process_pool import process_pool, run_process_jobs

seen = {}
def done(j, values, errors):
    if j == 0:
        # Job 2 can only start if the dispatcher sent it before calling done(0).
        deadline = time.monotonic() + 10
        while not os.path.exists(os.path.join(folder, "2")) and time.monotonic() < deadline:
            time.sleep(0.01)
        seen["job 2 started while done(0) ran"] = os.path.exists(os.path.join(folder, "2"))
    seen[j] = (values, errors)

run_process_jobs(process_pool(1), Target(folder), [[0], [1], [2]], done)
print(seen["job 2 started while done(0) ran"], seen[0], seen[1], seen[2])
"""


def test_next_job_is_sent_before_done_callbacks_run() -> None:
    """A slow ``done`` (a cache fill) does not hold back the job the finished worker runs next."""
    outcome = run_scenario(SCENARIO, timeout=120)
    assert outcome.returncode == 0, outcome.stderr
    assert outcome.lines()[0] == "True ([0], None) ([10], None) ([20], None)"
