"""A Determined PyTorchTrial, unchanged: `entrypoint: model_def:Trial`.

A small classifier on a synthetic two-moons-like dataset made from the
trial's seed (no download): two inputs, a hidden layer of `width` units,
two classes. Needs torch on the node. With `data: {pause_s: S}` in the
config each batch also sleeps S seconds (to watch it train, or to stop a
node under it)."""

import math
import time

import torch
import torch.nn as nn

import determined as det
from determined import pytorch

RECORDS_TRAIN = 512
RECORDS_VALIDATION = 256


def make_dataset(records, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (records,), generator=g)
    angle = torch.rand(records, generator=g) * math.pi
    x = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    # Class 1 is the lower moon, shifted right.
    x = torch.where(labels[:, None] == 1, torch.stack([1 - x[:, 0], 0.5 - x[:, 1]], dim=1), x)
    x = x + 0.1 * torch.randn(records, 2, generator=g)
    return torch.utils.data.TensorDataset(x, labels)


class Trial(pytorch.PyTorchTrial):
    def __init__(self, context: pytorch.PyTorchTrialContext) -> None:
        self.context = context
        width = int(context.get_hparam("width"))
        self.model = context.wrap_model(nn.Sequential(nn.Linear(2, width), nn.Tanh(), nn.Linear(width, 2)))
        self.optimizer = context.wrap_optimizer(
            torch.optim.SGD(self.model.parameters(), lr=float(context.get_hparam("lr")), momentum=0.9)
        )
        self.scheduler = context.wrap_lr_scheduler(
            torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=1, gamma=0.9),
            step_mode=pytorch.LRScheduler.StepMode.STEP_EVERY_EPOCH,
        )
        self.loss = nn.CrossEntropyLoss()
        self.pause_s = float(context.get_data_config().get("pause_s", 0))

    def build_training_data_loader(self) -> pytorch.DataLoader:
        data = make_dataset(RECORDS_TRAIN, seed=1)
        return pytorch.DataLoader(data, batch_size=self.context.get_per_slot_batch_size(), shuffle=True)

    def build_validation_data_loader(self) -> pytorch.DataLoader:
        data = make_dataset(RECORDS_VALIDATION, seed=2)
        return pytorch.DataLoader(data, batch_size=self.context.get_per_slot_batch_size())

    def train_batch(self, batch, epoch_idx: int, batch_idx: int):
        x, y = batch
        time.sleep(self.pause_s)
        loss = self.loss(self.model(x), y)
        self.context.backward(loss)
        self.context.step_optimizer(self.optimizer)
        return {"loss": loss, "lr": self.scheduler.get_last_lr()[0]}

    def evaluate_batch(self, batch, batch_idx: int):
        x, y = batch
        out = self.model(x)
        return {
            "validation_loss": self.loss(out, y),
            "accuracy": (out.argmax(dim=1) == y).float().mean(),
        }


if __name__ == "__main__":
    # Off a cluster, Determined's local training mode: `python3 model_def.py`.
    import logging

    logging.basicConfig(level=logging.INFO, format=det.LOG_FORMAT)
    with pytorch.init(hparams={"lr": 0.1, "width": 16, "global_batch_size": 32}) as context:
        trial = Trial(context)
        pytorch.Trainer(trial, context).fit(max_length=pytorch.Epoch(2), validation_period=pytorch.Batch(16))
