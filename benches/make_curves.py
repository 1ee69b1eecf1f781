#!/usr/bin/env python3
"""Writes benches/curves/synthetic-v1.json: a lookup table of learning curves in the
`curves-v1` format that `resolute bench search` and benches/optuna_search.py read.

A closed-form family with seeded noise, built so that ranking configs early is hard
the way it is with real training: a high learning rate drops the loss fast and then
stalls higher (curves cross), wide nets start slower and end lower, every config has
an unexplained effect of its own, and each of the 3 seeds adds an offset and
per-epoch noise. Standard library only; the same file every run (seed 20261126).

    python3 benches/make_curves.py [--out FILE]
"""
import argparse
import itertools
import json
import math
import random

N_EPOCHS = 81
N_SEEDS = 3
SPACE = {
    "lr": [10 ** (-4 + 0.375 * k) for k in range(9)],  # 1e-4 .. 1e-1
    "width": [64, 256, 1024],
    "depth": [1, 2, 3],
    "dropout": [0.0, 0.1, 0.3],
}


def curve(params, effect, rng):
    """The validation loss after epochs 1..N_EPOCHS for one seed."""
    log_lr = math.log10(params["lr"])
    width = math.log2(params["width"]) - 6  # 0, 2, 4
    # Where it ends: best near lr 1e-2.5, better when wider and deeper, dropout
    # helps wide nets and hurts narrow ones.
    final = (
        0.30
        + 0.06 * (log_lr + 2.5) ** 2
        - 0.025 * width
        - 0.02 * (params["depth"] - 1)
        + params["dropout"] * (0.15 - 0.06 * width)
        + effect
    )
    # How fast: a high learning rate and a narrow net get there early.
    tau = 1.5 * 10 ** (-1.2 * (log_lr + 2.5)) * (1 + 0.5 * width) * (1 + 0.3 * params["depth"])
    offset = rng.gauss(0.0, 0.01)
    values = []
    for e in range(1, N_EPOCHS + 1):
        progress = (1 + e / tau) ** -0.9
        loss = final + (2.3 - final) * progress + offset + rng.gauss(0.0, 0.012)
        values.append(round(max(loss, 0.01), 5))
    return values


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benches/curves/synthetic-v1.json")
    args = parser.parse_args()
    rng = random.Random(20261126)
    configs = []
    names = list(SPACE)
    for i, values in enumerate(itertools.product(*SPACE.values())):
        params = dict(zip(names, values))
        effect = rng.gauss(0.0, 0.03)
        seeds = []
        for _ in range(N_SEEDS):
            loss = curve(params, effect, rng)
            accuracy = [round(max(0.0, min(1.0, 1.0 - v / 2.5)), 5) for v in loss]
            seeds.append({"validation_loss": loss, "validation_accuracy": accuracy})
        configs.append({"id": i, "params": params, "seeds": seeds})
    table = {
        "format": "curves-v1",
        "description": "synthetic crossing learning curves (benches/make_curves.py)",
        "n_epochs": N_EPOCHS,
        "n_seeds": N_SEEDS,
        "metrics": {"validation_loss": "min", "validation_accuracy": "max"},
        "space": SPACE,
        "configs": configs,
    }
    with open(args.out, "w") as f:
        json.dump(table, f, separators=(",", ":"))
        f.write("\n")
    print(f"{args.out}: {len(configs)} configs x {N_SEEDS} seeds x {N_EPOCHS} epochs")


if __name__ == "__main__":
    main()
