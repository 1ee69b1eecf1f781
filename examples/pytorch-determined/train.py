"""A PyTorch script written for Determined's Core API, unchanged: it runs on
Resolute through the `determined` compatibility module (`pip install ./python`).
A small MLP on a synthetic regression task; checkpoints model and optimizer
state; resumes; stops when asked."""

import os

import determined as det
import torch


def main(core_context):
    info = det.get_cluster_info()
    hparams = info.trial.hparams
    torch.manual_seed(info.trial.trial_seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, int(hparams.get("width", 32))),
        torch.nn.ReLU(),
        torch.nn.Linear(int(hparams.get("width", 32)), 1),
    )
    opt = torch.optim.SGD(model.parameters(), lr=float(hparams.get("lr", 0.01)))
    x = torch.randn(512, 8)
    y = x.sum(dim=1, keepdim=True)
    steps_completed = 0
    if info.latest_checkpoint is not None:
        with core_context.checkpoint.restore_path(info.latest_checkpoint) as path:
            state = torch.load(os.path.join(path, "state.pt"))
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            steps_completed = state["steps"]
    for op in core_context.searcher.operations():
        while steps_completed < op.length:
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            steps_completed += 1
            if steps_completed % 10 == 0:
                core_context.train.report_training_metrics(
                    steps_completed=steps_completed, metrics={"loss": loss.item()}
                )
                core_context.train.report_validation_metrics(
                    steps_completed=steps_completed, metrics={"validation_loss": loss.item()}
                )
                with core_context.checkpoint.store_path({"steps_completed": steps_completed}) as (path, _):
                    torch.save(
                        {"model": model.state_dict(), "opt": opt.state_dict(), "steps": steps_completed},
                        os.path.join(path, "state.pt"),
                    )
                if core_context.preempt.should_preempt():
                    return
                op.report_progress(steps_completed)
        op.report_completed(loss.item())


if __name__ == "__main__":
    with det.core.init() as core_context:
        main(core_context)
