"""``fusion-engine train --search``: choose backbones and fusion by cross-validation, train the winner, save it."""

from __future__ import annotations

import json
import time

from fusion_engine.cli.common import (
    apply_weights_dir,
    encryption_key,
    given,
    load_train_test,
    logger,
    report_summary,
    train_config_from,
)
from fusion_engine.cli.common import engine as make_engine
from fusion_engine.errors import ConfigError
from fusion_engine.search.result import side_paths
from fusion_engine.search.run import search
from fusion_engine.training.config import held_out_runtime
from fusion_engine.training.feature_cache import FeatureCache
from fusion_engine.training.metrics import format_report
from fusion_engine.training.report import write_report_beside


def add_search_options(parser) -> None:
    """The ``--search`` flags of ``fusion-engine train``."""
    group = parser.add_argument_group("automatic selection (--search)")
    group.add_argument(
        "--search",
        action="store_true",
        help="choose backbones and fusion by cross-validation on the training data, then train the winner",
    )
    group.add_argument(
        "--candidates",
        metavar="FILE",
        help='candidate backbones (JSON/YAML: a list, or {"backbones": [...], "fusions": ...}); '
        "default: every entry of the weights index",
    )
    group.add_argument("--time-budget", type=float, metavar="MIN", help="minutes for the selection after extraction")
    group.add_argument("--max-branches", type=int, metavar="K", help="largest backbone subset (default 3)")
    group.add_argument("--folds", type=int, help="cross-validation folds (default 5)")
    group.add_argument(
        "--race-margin",
        type=float,
        metavar="ACC",
        help="a row this far (and 2 paired s.e.) behind the best after 2 folds stops there (default 0.005; 0: off)",
    )
    group.add_argument(
        "--prefer-best",
        action="store_true",
        help="pick the best CV row even if its extra backbones gained less than the fold noise",
    )
    group.add_argument(
        "--search-epochs",
        type=int,
        metavar="N",
        help="head epochs per CV fold (default: about 300 optimizer steps, 10 to --epochs)",
    )


def run_search(args) -> int:
    """``fusion-engine train --search``: select, train the winner, evaluate it on held-out data, save RUN_DIR."""
    apply_weights_dir(args)
    log = logger(args.json)
    if args.config:
        raise ConfigError(
            "--search chooses the backbones and the fusion itself; give the candidate backbones with "
            "--candidates FILE instead of --config (or drop --search to train that config)"
        )
    if args.mode == "finetune":
        raise ConfigError(
            "--search works on frozen, cached features; train the chosen config with --mode finetune "
            "afterwards (fusion-engine train --config RUN_DIR.config.json --mode finetune)"
        )
    data, train_data, test_data = load_train_test(args, log, " (the search sees only these)")
    train_config = train_config_from(args)  # --mode finetune was refused above
    search_overrides = given(
        time_budget=args.time_budget,
        max_branches=args.max_branches,
        folds=args.folds,
        race_margin=args.race_margin,
        epochs=args.search_epochs,
        prefer_fewer=False if args.prefer_best else None,
    )
    engine = make_engine()
    key = encryption_key(args, required=args.encrypt)
    result = search(
        train_data,
        args.candidates,
        test=test_data,
        engine=engine,
        train_config=train_config,
        fusions=[args.fusion] if args.fusion else None,
        cache_dir=args.cache_dir,
        use_cache=not args.no_cache,
        progress=not args.quiet,
        log=log,
        **search_overrides,
    )
    start = time.perf_counter()
    model, history = result.fit(
        train_data, cache_dir=args.cache_dir, use_cache=not args.no_cache, progress=not args.quiet, log=log
    )
    device = train_config.device if train_config.device != "auto" else "cpu"
    cache = FeatureCache(args.cache_dir, enabled=not args.no_cache, runtime=held_out_runtime(train_config), log=log)
    report = model.evaluate(test_data, cache=cache, device=device, progress=not args.quiet)  # the search's graphs
    result.final = {
        "held_out_accuracy": report["accuracy"],
        "macro_f1": report["macro_f1"],
        "seconds": round(time.perf_counter() - start, 3),
    }
    history["search"] = result.to_dict()
    model.metrics = {"test": report}
    out = result.save(model, args.out, encryption_key=key, signing_key=args.sign_key)
    config_path, board_path = side_paths(args.out)
    if args.json:
        print(
            json.dumps(
                {**report_summary(report), "run_dir": str(out), "config": str(config_path), "search": result.to_dict()},
                default=str,
            )
        )
    else:
        log("\n" + result.table())
        log(result.summary())
        log(f"\nheld-out test results of the trained winner ({len(test_data)} images the search never saw):")
        log(format_report(report))
        log(
            f"saved to {out}; its config: {config_path} (rerun or edit it: fusion-engine train --config "
            f"{config_path}); leaderboard: {board_path}"
        )
    write_report_beside(report, out, model=model, log=log)  # RUN_DIR.report.html, with the leaderboard
    return 0
