"""Run a list of torchdiff commands on one torchrun rank (tests/test_distributed.py).

The process group is joined once (gloo) and each command goes through
``distributed.run_command``, the same path ``torchrun -m torchdiff`` takes, so one
launch pays torch's start-up once. Each result (exit code, stdout, stderr) goes to
``NAME.rRANK`` as JSON, with ``distributed.TIMINGS`` (what this rank measured). A
job may name a rank that stalls (sleeps) before it, to check that the others time
out and name it.
"""

import contextlib
import io
import json
import os
import sys
import time

import torch.distributed as dist

from torchdiff import cli, distributed

jobs = json.load(open(sys.argv[1]))
ctx = distributed.init_from_env("cpu", float(os.environ.get("TORCHDIFF_TEST_TIMEOUT", "120")))
try:
    for out, argv, stall in jobs:
        if stall is not None and stall[0] == ctx.rank:
            time.sleep(stall[1])
        stdout, stderr = io.StringIO(), io.StringIO()
        distributed.TIMINGS.clear()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = distributed.run_command(ctx, argv, cli._main)
        with open(f"{out}.r{os.environ['RANK']}", "w") as f:
            json.dump({"code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue(),
                       "timings": dict(distributed.TIMINGS)}, f)
finally:
    dist.destroy_process_group()
