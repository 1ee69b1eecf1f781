"""`python3 -m determined.launch.wrap_rank RANK -- CMD...`: runs CMD and
prefixes each line it prints with `[rank=N] `, so that the trial's log tells
its processes apart. RANK is a number or the name of a variable holding one
(torchrun sets `RANK` for each process it starts)."""

import os
import signal
import subprocess
import sys
import threading


def _rank(arg):
    if arg.isdigit():
        return int(arg)
    value = os.environ.get(arg)
    if value is None or not value.isdigit():
        raise SystemExit("wrap_rank: {} is neither a rank nor a variable holding one".format(arg))
    return int(value)


def _copy(src, dst, prefix):
    for line in iter(src.readline, b""):
        dst.write(prefix + line)
        dst.flush()
    src.close()


def main(argv):
    if len(argv) < 2:
        raise SystemExit("usage: python3 -m determined.launch.wrap_rank RANK [--] CMD...")
    rank = _rank(argv[0])
    cmd = argv[2:] if argv[1] == "--" else argv[1:]
    if not cmd:
        raise SystemExit("wrap_rank: no command to run")
    prefix = "[rank={}] ".format(rank).encode()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    signal.signal(signal.SIGTERM, lambda *_: child.poll() is None and child.send_signal(signal.SIGTERM))
    copies = [
        threading.Thread(target=_copy, args=(child.stdout, sys.stdout.buffer, prefix)),
        threading.Thread(target=_copy, args=(child.stderr, sys.stderr.buffer, prefix)),
    ]
    for t in copies:
        t.start()
    code = child.wait()
    for t in copies:
        t.join()
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
