"""Split-Digits strategy comparison over seeds (CPU, no downloads): ``mmtune continual sweep`` per scenario.

    python benchmarks/continual_digits.py                       # class + domain + task, 5 seeds
    python benchmarks/continual_digits.py --scenarios class --seeds 3 --strategies naive,replay,replay+lwf

For each scenario this is ``mmtune continual sweep continual-digits --scenario S --strategies ...
--seeds N --output OUT/S`` (the shipped recipe: 5 tasks of 2 digits, an MLP 64-256-256-10, 10
epochs per task, AdamW 1e-3, batch 32), with one addition the command has no flag for: ``l2p``
runs on the digits transformer (it prepends prompts to tokens). Each scenario's report
(``OUT/S/sweep.md``, heatmaps, per-task curves) holds the table: mean ± std over seeds
(population std), in points. Expected orderings (docs/reference/continual.md#expected-results-on-split-digits): class-incremental
naive ~ EWC ~ LwF ~ 20%, replay (200 examples) ~85-90%, DER++ ~93%, joint ~95%; permuted
domain-incremental replay > EWC > naive.
"""

from __future__ import annotations

import argparse

from mmtune.continual.sweep import parse_strategies, table  # noqa: E402
from mmtune.continual.sweep_report import run_sweep

DEFAULTS = {
    "class": "naive,joint,ewc,online_ewc,lwf,feature_kd,zscl,replay,derpp,agem,gem,replay+lwf,replay+ewc,olora,l2p",
    "domain": "naive,joint,ewc,online_ewc,lwf,feature_kd,replay,derpp,agem,gem,replay+ewc,olora",
    "task": "naive,ewc,lwf,replay,derpp,gem,task_lora",
}


def l2p_net(data: dict, name: str) -> None:
    """L2P prepends prompts to tokens: it runs on the digits transformer (the others on the MLP)."""
    if "l2p" in name.split("+"):
        data["continual"]["digits_net"] = {"arch": "transformer", "hidden": 64, "depth": 2, "heads": 4}
        data["train"]["lr"] = 3e-3


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="dotted recipe overrides")
    ap.add_argument("--scenarios", nargs="+", default=["class", "domain", "task"], choices=list(DEFAULTS))
    ap.add_argument("--strategies", default=None, help="comma-separated (`+` composes); default: a per-scenario list")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--recipe", default="continual-digits")
    ap.add_argument("--output", default="runs/bench-continual-digits")
    args = ap.parse_args(argv)
    reports = {}
    for scenario in args.scenarios:
        res = run_sweep(args.recipe, parse_strategies(args.strategies or DEFAULTS[scenario]), range(args.seeds),
                        f"{args.output}/{scenario}", overrides=args.overrides, scenario=scenario, edit=l2p_net,
                        log=lambda s: print("  " + s, flush=True))
        print("\n" + table(res["results"], res["meta"]["title"] + f" ({res['meta']['seconds']:.0f} s)") + "\n",
              flush=True)
        reports[scenario] = res["report"]
    return reports


if __name__ == "__main__":
    main()
