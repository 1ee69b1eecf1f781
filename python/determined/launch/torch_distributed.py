"""`python3 -m determined.launch.torch_distributed [TORCHRUN_OVERRIDES... --] SCRIPT...`
(or `--trial module:TrialClass`, which runs `determined.exec.harness`):
starts one process of SCRIPT per slot of this node for a multi-slot trial,
as Determined's launcher does.

With torch importable it runs torchrun (`python3 -m torch.distributed.run`)
with the node's rendezvous: `--nnodes` the nodes of the trial's gang,
`--nproc_per_node` this node's slots, `--node_rank` this node's place, and
`--master_addr`/`--master_port` rank 0's node and the trial's port; torchrun
gives each process RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE and
GROUP_RANK. Without torch (CPU slots, a script that uses only the Core API's
collectives) it starts the processes itself with the same variables. Either
way each line a process prints is prefixed with `[rank=N] `, and when one
process fails the others are stopped and the launcher exits with its code."""

import os
import signal
import subprocess
import sys
import time

from resolute.core import ClusterInfo, get_cluster_info

# How long the other processes get to exit after one failed, in seconds,
# before they are killed.
STOP_GRACE_S = 10
# How often the launcher looks at its processes, in seconds.
POLL_S = 0.1


def parse(argv):
    """`(torchrun overrides, script)` from the arguments: everything before a
    `--` overrides torchrun's flags; without one, all of it is the script."""
    if "--" in argv:
        at = argv.index("--")
        overrides, script = argv[:at], argv[at + 1 :]
    else:
        overrides, script = [], list(argv)
    if script[:1] == ["--trial"]:
        # A Trial class (the node's command for `entrypoint: module:Class`
        # with several slots): every process runs the harness.
        if len(script) != 2:
            raise SystemExit("usage: python3 -m determined.launch.torch_distributed --trial module:TrialClass")
        script = [sys.executable, "-m", "determined.exec.harness", script[1]]
    if not script:
        raise SystemExit("usage: python3 -m determined.launch.torch_distributed [OVERRIDES... --] SCRIPT...")
    return overrides, script


class Plan:
    """This node's share of the trial's processes."""

    def __init__(self, info, env):
        self.nproc = max(1, len(info.slot_ids))
        self.nnodes = max(1, len(info.container_addrs))
        self.node_rank = info.container_rank
        raw = info._raw
        self.first_rank = int(raw.get("first_rank", 0))
        self.world_size = int(raw.get("world_size", self.nproc))
        self.master_addr = "127.0.0.1" if self.nnodes == 1 else info.container_addrs[0]
        self.master_port = env.get("MASTER_PORT", "29400")


def have_torch():
    try:
        import torch.distributed.run  # noqa: F401 - only asking whether it is there
    except ImportError:
        return False
    return True


def torchrun_cmd(plan, overrides, script):
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        str(plan.nnodes),
        "--nproc_per_node",
        str(plan.nproc),
        "--node_rank",
        str(plan.node_rank),
        "--master_addr",
        plan.master_addr,
        "--master_port",
        str(plan.master_port),
        "--max_restarts",
        "0",
        *overrides,
        "--module",
        "determined.launch.wrap_rank",
        "RANK",
        "--",
        *script,
    ]


def process_env(plan, local_rank, env):
    out = dict(env)
    out.update(
        RANK=str(plan.first_rank + local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(plan.world_size),
        LOCAL_WORLD_SIZE=str(plan.nproc),
        GROUP_RANK=str(plan.node_rank),
        GROUP_WORLD_SIZE=str(plan.nnodes),
        MASTER_ADDR=plan.master_addr,
        MASTER_PORT=str(plan.master_port),
    )
    return out


def supervise(children):
    """Waits for every process; the first that fails stops the others.
    Returns the exit code of the launcher."""
    stopped = []

    def forward(signum, _frame):
        stopped.append(signum)
        for c in children:
            if c.poll() is None:
                c.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while True:
        codes = [c.poll() for c in children]
        failed = [code for code in codes if code not in (None, 0)]
        if failed:
            for c in children:
                if c.poll() is None:
                    c.terminate()
            deadline = time.monotonic() + STOP_GRACE_S
            while any(c.poll() is None for c in children) and time.monotonic() < deadline:
                time.sleep(POLL_S)
            for c in children:
                if c.poll() is None:
                    c.kill()
                    c.wait()
            code = failed[0]
            return code if code > 0 else 128 - code
        if all(code == 0 for code in codes):
            return 0
        time.sleep(POLL_S)


def main(argv):
    overrides, script = parse(argv)
    info = get_cluster_info() or ClusterInfo()
    plan = Plan(info, os.environ)
    if have_torch():
        return subprocess.call(torchrun_cmd(plan, overrides, script))
    if overrides:
        raise SystemExit("torchrun overrides {} given, but torch is not importable".format(overrides))
    print(
        "determined.launch.torch_distributed: torch is not importable; starting {} process(es) "
        "with the torchrun variables (RANK {}..{} of {})".format(
            plan.nproc, plan.first_rank, plan.first_rank + plan.nproc - 1, plan.world_size
        ),
        file=sys.stderr,
        flush=True,
    )
    children = []
    for i in range(plan.nproc):
        cmd = [sys.executable, "-m", "determined.launch.wrap_rank", str(plan.first_rank + i), "--", *script]
        children.append(subprocess.Popen(cmd, env=process_env(plan, i, os.environ)))
    return supervise(children)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
