"""The README's attack table, end to end: a small CIFAR-10 ViT trained normally and four ways adversarially,
each scored by white-box PGD and by the worst case of PGD, APGD-CE and APGD-DLR (AutoAttack's untargeted
attacks), by the black-box Square (scores) and RayS (decisions) attacks, and a transfer attack from one
normally trained model to another.

Every model is the README's CIFAR-small ViT (0.31M parameters: 32/4, width 96, 4 blocks), trained into
RUNS/NAME (an interrupted run resumes; a finished one is reused). The JSON keeps one entry per row, so
`--only` updates some rows and leaves the others. The attack is PGD with a random start at
each ε on a seeded sample of the test set, the same images and the same keyed random starts as
`vitkit attack RUN --eps ... --steps S --n N`. Adversarial training uses a CPU budget: PGD-2 with steps of
5/255 at ε = 8/255.

The black-box attacks cost up to --queries forward passes per image that resists them, so they run at
--black-box-eps only (default 8/255). A black-box attack that beat the white-box ones would mean gradient
masking; the row's `all_attacks_robust_accuracy` counts an image robust only if every attack failed.
`--black-box-only` adds those figures to rows already in the JSON (it attacks with PGD and APGD again at
--black-box-eps for the combined count, not at every ε).

    PYTHONPATH=src OMP_NUM_THREADS=2 python bench/robustness.py --data ../shared/datasets/cifar10-jpg.tar.gz
    PYTHONPATH=src python bench/robustness.py --only standard,madry-2ep --device cuda
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import CIFAR_SMALL, RESULTS, device_and_sync, environment, parse_sets, save_report, train_run
from vitkit.attacks import Robustness, apgd, attack_outcomes, load_pixel_model, pgd, rays, square, worst_case
from vitkit.cli.main import list_of, parse_number  # the --eps syntax of `vitkit attack`
from vitkit.data import load_dataset
from vitkit.train import build_config

ADVERSARIAL = dict(adv="pgd", eps=8 / 255, adv_steps=2, adv_step_size=5 / 255)
# name: (what the row is, training options beyond CIFAR_SMALL)
MODELS = {
    "standard": ("standard training", dict(epochs=4)),
    "standard-seed1": ("standard training, seed 1 (the transfer target)", dict(epochs=4, seed=1)),
    "half-half": ("seed 002's half-half PGD training (half of each batch adversarial)", dict(epochs=3, **ADVERSARIAL)),
    "half-half-2ep": ("half-half, 2 epochs", dict(epochs=2, **ADVERSARIAL)),
    "madry-2ep": ("Madry et al. (all adversarial, --adv-mix 0), 2 epochs", dict(epochs=2, **ADVERSARIAL, adv_mix=0.0)),
    "trades-2ep": ("TRADES β = 6 (--adv trades), 2 epochs", dict(epochs=2, **{**ADVERSARIAL, "adv": "trades"},
                                                                 trades_beta=6.0)),
    # With PGD-2, τ = 0 is the one τ that changes much: an image stops at the first iterate it is misclassified at.
    "fat-2ep": ("FAT τ = 0 (Madry's batches, each image's PGD stopped once misclassified), 2 epochs",
                dict(epochs=2, **ADVERSARIAL, adv_mix=0.0, fat_tau=0)),
}
TRANSFER = ("transfer", "standard-seed1", "standard")  # row name, target, surrogate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="cifar10", help="cifar10 (official archive) or the JPEG copy's .tar.gz")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--only", help=f"comma-separated rows, of {', '.join([*MODELS, TRANSFER[0]])} (default all)")
    parser.add_argument("--eps", type=list_of(parse_number), default=[2 / 255, 4 / 255, 8 / 255], help="ℓ∞ budgets in [0, 1] units")
    parser.add_argument("--steps", type=int, default=20, help="PGD steps")
    parser.add_argument("--apgd-steps", type=int, default=100,
                        help="then APGD-CE and APGD-DLR with this many steps on what PGD left (0: PGD only)")
    parser.add_argument("--queries", type=int, default=5000,
                        help="Square's and RayS's queries per image, white-box rows (0: no black-box attacks)")
    parser.add_argument("--black-box-eps", type=list_of(parse_number), default=[8 / 255],
                        help="the budgets of the black-box attacks, some of --eps")
    parser.add_argument("--black-box-only", action="store_true",
                        help="only add the black-box figures to the rows in the JSON (the other figures stay)")
    parser.add_argument("--images", type=int, default=1000, help="a seeded random sample of the test set (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="the sample's and the random starts' seed")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a training option of every model (a quick check: --set epochs=1)")
    parser.add_argument("--runs", type=Path, default=Path("runs/robustness"), help="run folders")
    parser.add_argument("--out", type=Path, help="JSON (default bench/results/robustness-<device>.json)")
    args = parser.parse_args()

    rows = [*MODELS, TRANSFER[0]]
    wanted = rows if args.only is None else args.only.split(",")
    if set(wanted) - set(rows):
        raise SystemExit(f"--only {args.only}: the rows are {', '.join(rows)}")
    if set(args.black_box_eps) - set(args.eps):
        raise SystemExit("--black-box-eps: give budgets that are also in --eps")
    if args.black_box_only and not args.queries:
        raise SystemExit("--black-box-only needs --queries above 0")
    needed = [*wanted, *TRANSFER[1:]] if TRANSFER[0] in wanted else wanted  # the transfer row needs its two models
    device, sync = device_and_sync(args.device)
    overrides = parse_sets(args.set)

    trained = {}
    for name in [n for n in MODELS if n in needed]:
        cfg = build_config(flag_values={"data": args.data, "device": str(device), **CIFAR_SMALL, **MODELS[name][1], **overrides})
        summary, history, finished = train_run(cfg, args.runs / name)
        trained[name] = {"row": MODELS[name][0], "options": MODELS[name][1], "reused_finished_run": finished,
                         "epochs": len(history), "train_seconds": round(sum(r["epoch_seconds"] for r in history), 1),
                         "test_accuracy_full_test_set": summary["test_accuracy"], "config": cfg.to_dict()}

    def attack(m, x, y, eps, g):
        return pgd(m, x, y, eps, steps=args.steps, generator=g)

    # AutoAttack's way of counting: an image is robust only if PGD, APGD-CE and APGD-DLR all fail on it.
    strongest = worst_case(attack, *[lambda m, x, y, eps, g, loss=loss: apgd(m, x, y, eps, steps=args.apgd_steps,
                                                                              loss=loss, generator=g)
                                     for loss in ("ce", "dlr")])

    black_box = {"square": lambda m, x, y, eps, g: square(m, x, y, eps, queries=args.queries, generator=g),
                 "rays": lambda m, x, y, eps, g: rays(m, x, y, eps, queries=args.queries)}

    models = {name: load_pixel_model(args.runs / name, device) for name in trained}
    info = next(iter(models.values()))[1]
    data = load_dataset(info["data"], "test", image_size=info["model"]["image_size"]).sample(args.images, args.seed)
    pairs = [(name, name, None) for name in trained if name in wanted]
    if TRANSFER[0] in wanted:
        pairs.append(TRANSFER)
    out = args.out or RESULTS / f"robustness-{device.type}.json"
    results = json.loads(out.read_text()) if out.is_file() else {"rows": {}}
    settings = {"data": args.data, "images": len(data), "seed": args.seed, "attack": "pgd", "norm": "linf",
                "steps": args.steps, "step_size": "2.5·ε/steps", "random_start": True, "eps": args.eps,
                "worst_case": f"PGD-{args.steps}, then APGD-CE and APGD-DLR with {args.apgd_steps} steps each on the "
                              "images still right (white-box rows)" if args.apgd_steps else None,
                "training_overrides": overrides,
                "command": f"vitkit attack RUN [--surrogate RUN] --eps ... --steps {args.steps} --n {args.images} "
                           f"--seed {args.seed}"}

    def add_black_box(row: str, model, white=None) -> None:
        """Square and RayS at --black-box-eps, and the worst case of every attack there; `white`: the
        white-box outcomes at --eps when they are at hand (else they are attacked again at --black-box-eps)."""
        start = time.perf_counter()
        if white is None:
            white = attack_outcomes(model, data.images, data.labels, strongest if args.apgd_steps else attack,
                                    args.black_box_eps, batch_size=args.batch_size, seed=args.seed)
        else:  # column 0 is the clean image, column 1 + i the attack at --eps[i]
            white = white[:, [0] + [1 + args.eps.index(eps) for eps in args.black_box_eps]]
        figures, survived = {}, white
        for name, one in black_box.items():
            outcomes = attack_outcomes(model, data.images, data.labels, one, args.black_box_eps,
                                       batch_size=args.batch_size, seed=args.seed)
            figures[f"{name}_robust_accuracy"] = Robustness.from_outcomes(args.black_box_eps, outcomes).robust_accuracy
            survived = survived & outcomes
        sync()
        figures["all_attacks_robust_accuracy"] = Robustness.from_outcomes(args.black_box_eps, survived).robust_accuracy
        results["rows"][row].update(black_box_eps=args.black_box_eps, black_box_queries=args.queries, **figures,
                                    black_box_seconds=round(time.perf_counter() - start, 1))
        print(f"{row:>16s}  at " + ", ".join(f"{eps * 255:.3g}/255" for eps in args.black_box_eps) + ": "
              + "  ".join(f"{key.removesuffix('_robust_accuracy')} {value}" for key, value in figures.items()))

    if args.black_box_only:
        for row, target, surrogate in pairs:
            if surrogate is None:
                if row not in results["rows"]:
                    raise SystemExit(f"--black-box-only: {out} has no row {row}: run without --black-box-only first")
                stored = results["rows"][row]["settings"]
                if any(stored[key] != settings[key] for key in ("images", "seed", "steps", "worst_case")):
                    raise SystemExit(f"--black-box-only: row {row} of {out} was attacked with other --images, "
                                     "--seed, --steps or --apgd-steps: pass the same")
                add_black_box(row, models[target][0])
        save_report(results, out)
        return

    for row, target, surrogate in pairs:
        sync()
        start = time.perf_counter()
        outcomes = attack_outcomes(models[target][0], data.images, data.labels, attack, args.eps,
                                   surrogate=models[surrogate][0] if surrogate else None,
                                   batch_size=args.batch_size, seed=args.seed)
        sync()
        figures = Robustness.from_outcomes(args.eps, outcomes)
        results["rows"][row] = {**environment(device), "settings": settings, **(trained[row] if row in trained else {"row": f"PGD on {surrogate}, scored on {target}"}),
                        "target": target, "surrogate": surrogate, "clean_accuracy": figures.clean_accuracy,
                        "robust_accuracy": figures.robust_accuracy, "attack_success_rate": figures.success_rate,
                        "attack_seconds": round(time.perf_counter() - start, 1)}
        print(f"{row:>16s}  clean {figures.clean_accuracy:.3f}  PGD "
              + "  ".join(f"{eps * 255:.3g}/255: {r:.3f}" for eps, r in zip(args.eps, figures.robust_accuracy)))
        if args.apgd_steps and surrogate is None:
            start = time.perf_counter()
            worst_outcomes = attack_outcomes(models[target][0], data.images, data.labels, strongest, args.eps,
                                             batch_size=args.batch_size, seed=args.seed)
            worst = Robustness.from_outcomes(args.eps, worst_outcomes)
            sync()
            results["rows"][row].update(worst_case_robust_accuracy=worst.robust_accuracy,
                                        worst_case_seconds=round(time.perf_counter() - start, 1))
            print(f"{'':>16s}  {'':11s}  + APGD-CE, APGD-DLR "
                  + "  ".join(f"{eps * 255:.3g}/255: {r:.3f}" for eps, r in zip(args.eps, worst.robust_accuracy)))
        if args.queries and surrogate is None:
            add_black_box(row, models[target][0], worst_outcomes if args.apgd_steps else outcomes)
    save_report(results, out)


if __name__ == "__main__":
    main()
