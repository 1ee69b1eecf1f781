#!/usr/bin/env python3
"""Optuna 5 on the same curves file and protocol as `resolute bench search`, and the
side-by-side comparison with Resolute's searchers in one command:

    python3 benches/optuna_search.py --compare            # both, with the targets
    python3 benches/optuna_search.py [--json]             # Optuna only

Optuna is installed with pip into benches/.venv-optuna by this script the first
time (it re-runs itself there). Protocol (see crates/cli/src/bench/search.rs): the
space is the set of configs, sampled uniformly (RandomSampler); a trial's curve is
seeds[trial_seed % n_seeds][metric], the trial seed drawn from a RNG seeded by the
run's seed; one worker; every epoch is reported and costs one epoch of the budget;
a pruned trial is never resumed (Optuna cannot); the incumbent is the trial trained
to R with the best observed final value; regret and epochs-to-top-5% are computed
against the mean over seeds of each config's final value. Pruners: NopPruner,
SuccessiveHalvingPruner and HyperbandPruner, min resource 1, reduction factor 3.
"""
import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
VENV = os.path.join(HERE, ".venv-optuna")
OPTUNA_SPEC = "optuna>=5,<6"
TOP_FRACTION = 0.05


def ensure_optuna():
    """Imports optuna 5, installing it into the venv (and re-running there) if needed.
    Also pins PYTHONHASHSEED: HyperbandPruner assigns brackets by hashing, and a run
    must give the same figures twice."""
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, os.path.abspath(__file__)] + sys.argv[1:])
    try:
        import optuna  # noqa: F401

        if int(optuna.__version__.split(".")[0]) >= 5:
            return
    except ImportError:
        pass
    python = os.path.join(VENV, "bin", "python3")
    if os.path.abspath(sys.executable) == os.path.abspath(python):
        sys.exit(f"optuna 5 is not importable in {VENV} even after installing it")
    if not os.path.exists(python):
        print(f"installing {OPTUNA_SPEC} into {VENV} ...", file=sys.stderr)
        subprocess.check_call([sys.executable, "-m", "venv", VENV])
        subprocess.check_call(
            [python, "-m", "pip", "install", "--quiet", OPTUNA_SPEC], stdout=sys.stderr
        )
    os.execv(python, [python, os.path.abspath(__file__)] + sys.argv[1:])


class Truth:
    def __init__(self, table, metric):
        if metric not in table["metrics"]:
            sys.exit(f"--metric {metric}: the file has {sorted(table['metrics'])}")
        self.smaller = table["metrics"][metric] == "min"
        self.true_final = [
            statistics.fmean(s[metric][-1] for s in c["seeds"]) for c in table["configs"]
        ]
        ranked = sorted(self.true_final, reverse=not self.smaller)
        top_n = max(1, math.ceil(len(ranked) * TOP_FRACTION))
        self.best, self.worst, self.threshold = ranked[0], ranked[-1], ranked[top_n - 1]

    def better(self, a, b):
        return a < b if self.smaller else a > b

    def in_top(self, v):
        return not self.better(self.threshold, v)


def run_one(optuna, table, truth, metric, pruner_name, budget, seed):
    r = table["n_epochs"]
    n = len(table["configs"])
    pruners = {
        "nop": lambda: optuna.pruners.NopPruner(),
        "sha": lambda: optuna.pruners.SuccessiveHalvingPruner(
            min_resource=1, reduction_factor=3, min_early_stopping_rate=0
        ),
        "hyperband": lambda: optuna.pruners.HyperbandPruner(
            min_resource=1, max_resource=r, reduction_factor=3
        ),
    }
    study = optuna.create_study(
        study_name=f"bench-{pruner_name}-{seed}",
        direction="minimize" if truth.smaller else "maximize",
        sampler=optuna.samplers.RandomSampler(seed=seed),
        pruner=pruners[pruner_name](),
    )
    seeds_rng = random.Random(seed * 7919 + 17)
    spent, trials, incumbent, top5 = 0, 0, None, None
    while spent < budget:
        trial = study.ask()
        trials += 1
        config = trial.suggest_int("config", 0, n - 1)
        curve = table["configs"][config]["seeds"][seeds_rng.randrange(2**31) % table["n_seeds"]][
            metric
        ]
        for epoch in range(1, r + 1):
            if spent + 1 > budget:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                break
            spent += 1
            value = curve[epoch - 1]
            trial.report(value, epoch)
            if epoch == r:
                if incumbent is None or truth.better(value, incumbent[0]):
                    incumbent = (value, config)
                    if top5 is None and truth.in_top(truth.true_final[config]):
                        top5 = spent
                study.tell(trial, value)
                break
            if trial.should_prune():
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                break
    if incumbent is None:
        regret = abs(truth.worst - truth.best)
    else:
        regret = abs(truth.true_final[incumbent[1]] - truth.best)
    return regret, top5, trials


def summarize(results):
    regrets = sorted(r[0] for r in results)
    epochs = sorted(math.inf if r[1] is None else r[1] for r in results)
    median_epochs = epochs[round((len(epochs) - 1) * 0.5)]
    return {
        "mean_regret": statistics.fmean(regrets),
        "median_regret": regrets[round((len(regrets) - 1) * 0.5)],
        "top5_hit_rate": sum(r[1] is not None for r in results) / len(results),
        "top5_median_epochs": None if math.isinf(median_epochs) else float(median_epochs),
        "trials": statistics.fmean(r[2] for r in results),
    }


def parse_seeds(text):
    a, b = text.split("..")
    return range(int(a), int(b))


def resolute_figures(args, budget):
    exe = shutil.which("resolute")
    cmd = [exe] if exe else ["cargo", "run", "--release", "--quiet", "--"]
    cmd += ["bench", "search", "--curves", args.curves, "--metric", args.metric,
            "--budget", str(budget), "--seeds", args.seeds, "--json"]
    out = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def print_table(title, reports):
    print(title)
    print(f"  {'searcher':<30} {'mean_regret':>12} {'median_regret':>13} {'top5_hit':>9} "
          f"{'top5_epochs':>12} {'trials':>8}")
    for name, r in reports.items():
        e = r["top5_median_epochs"]
        print(f"  {name:<30} {r['mean_regret']:>12.4f} {r['median_regret']:>13.4f} "
              f"{r['top5_hit_rate']:>9.2f} {'never' if e is None else f'{e:.0f}':>12} "
              f"{r['trials']:>8.1f}")


def main():
    p = argparse.ArgumentParser(description="Optuna on a curves-v1 table (see the module doc)")
    p.add_argument("--curves", default="benches/curves/synthetic-v1.json")
    p.add_argument("--metric", default="validation_loss")
    p.add_argument("--budget", type=int, help="epochs per run (default: 20 x n_epochs)")
    p.add_argument("--seeds", default="0..50", help="A..B, B exclusive")
    p.add_argument("--json", action="store_true")
    p.add_argument("--compare", action="store_true",
                   help="also run `resolute bench search` and check the targets")
    args = p.parse_args()
    ensure_optuna()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    path = args.curves if os.path.isabs(args.curves) else os.path.join(REPO, args.curves)
    with open(path) as f:
        table = json.load(f)
    if table.get("format", "curves-v1") != "curves-v1":
        sys.exit(f"{path}: format {table.get('format')!r} is not 'curves-v1'")
    budget = args.budget or 20 * table["n_epochs"]
    truth = Truth(table, args.metric)
    ours = {}
    for pruner in ["nop", "sha", "hyperband"]:
        results = [run_one(optuna, table, truth, args.metric, pruner, budget, s)
                   for s in parse_seeds(args.seeds)]
        ours[f"optuna_random_{pruner}"] = summarize(results)
    if not args.compare:
        if args.json:
            print(json.dumps(ours))
        else:
            print_table(f"optuna {optuna.__version__}: budget {budget} epochs, seeds {args.seeds}",
                        ours)
        return
    resolute = resolute_figures(args, budget)
    best_optuna = min(ours.items(), key=lambda kv: kv[1]["mean_regret"])
    best_ours = min(resolute.items(), key=lambda kv: kv[1]["mean_regret"])
    o_epochs = best_optuna[1]["top5_median_epochs"]
    r_epochs = best_ours[1]["top5_median_epochs"]
    regret_met = best_ours[1]["mean_regret"] <= best_optuna[1]["mean_regret"]
    epochs_met = r_epochs is not None and (o_epochs is None or r_epochs <= o_epochs * 2 / 3)
    verdict = {
        "budget": budget,
        "seeds": args.seeds,
        "optuna_version": optuna.__version__,
        "best_optuna": best_optuna[0],
        "best_resolute": best_ours[0],
        "regret_target_met": regret_met,
        "top5_epochs_target_met": epochs_met,
        "resolute": resolute,
        "optuna": ours,
    }
    if args.json:
        print(json.dumps(verdict))
        return
    print_table(f"budget {budget} epochs, seeds {args.seeds}, metric {args.metric}",
                {**resolute, **ours})
    print(f"best on mean regret: resolute {best_ours[0]} {best_ours[1]['mean_regret']:.4f}, "
          f"optuna {best_optuna[0]} {best_optuna[1]['mean_regret']:.4f}: "
          f"{'met' if regret_met else 'NOT met'} (at least match)")
    print(f"epochs to the top 5% (median): resolute {r_epochs}, optuna {o_epochs}: "
          f"{'met' if epochs_met else 'NOT met'} (at most two thirds)")


if __name__ == "__main__":
    main()
