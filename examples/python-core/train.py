"""A dependency-free trial: fits y = 3x + 1 with SGD, reports metrics, checkpoints
every `checkpoint_every` steps, resumes from its latest checkpoint, and stops
cleanly when the node asks. Runs on any Python >= 3.8 with the `resolute`
client installed (`pip install ./python`)."""

import json
import os
import random

import resolute


def main():
    info = resolute.get_cluster_info()
    hp = info.hparams
    lr = float(hp.get("lr", 0.05))
    steps = info.target_length or int(hp.get("steps", 200))
    every = int(hp.get("checkpoint_every", 20))
    rng = random.Random(info.trial_seed)
    w, b, step = 0.0, 0.0, 0
    with resolute.core.init() as ctx:
        if info.latest_checkpoint:
            with ctx.checkpoint.restore_path(info.latest_checkpoint) as path:
                with open(os.path.join(path, "state.json")) as f:
                    state = json.load(f)
            w, b, step = state["w"], state["b"], state["step"]
            rng.setstate(tuple(state["rng"][:1]) + (tuple(state["rng"][1]),) + tuple(state["rng"][2:]))
        while step < steps:
            x = rng.uniform(-1, 1)
            y = 3 * x + 1
            err = (w * x + b) - y
            w -= lr * err * x
            b -= lr * err
            step += 1
            if step % 10 == 0:
                ctx.train.report_training_metrics(steps_completed=step, metrics={"loss": err * err})
            if step % every == 0 or step == steps:
                loss = sum(((w * v + b) - (3 * v + 1)) ** 2 for v in (-1, -0.5, 0, 0.5, 1)) / 5
                ctx.train.report_validation_metrics(steps_completed=step, metrics={"validation_loss": loss})
                state = {"w": w, "b": b, "step": step, "rng": list(rng.getstate())}
                with ctx.checkpoint.store_path({"steps_completed": step}) as (path, _):
                    with open(os.path.join(path, "state.json"), "w") as f:
                        json.dump(state, f)
                if ctx.preempt.should_preempt():
                    print("preempted at step", step, flush=True)
                    return
    print("done at step", step, flush=True)


if __name__ == "__main__":
    main()
