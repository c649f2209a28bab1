"""On-device MoE scaling law and architecture planner.

* :mod:`.space`    - the design space: ``Arch(d_model, layers, E, g, k, s, vocab)`` -> ``MobileMoEConfig``,
                     exact accounting via :mod:`mobilemoe.accounting` (:func:`stats`).
* :mod:`.law`      - the joint MoE scaling law, robust fitting, bootstrap intervals, held-out error.
* :mod:`.sweep`    - the resumable sweep driver around ``train_one(config, tokens, out_dir) -> val_loss``.
* :mod:`.planner`  - Pareto-optimal architectures under memory / FLOPs budgets, frontier plot.
* :mod:`.profiles` - device profiles (YAML under ``scaling/profiles/``) and the roofline speed model.
"""

from mobilemoe.scaling.law import (Law, LawError, LawParams, Run, default_law, fit_family, fit_law, fit_table,
                                   load_law, read_runs, synthetic_runs)
from mobilemoe.scaling.planner import (PlanError, PlanResult, evaluate_space, plan, plot_frontier, project_speed,
                                       tier_comparison, tier_fit)
from mobilemoe.scaling.profiles import DeviceProfile, ProfileError, get_profile, list_profiles, load_profile
from mobilemoe.scaling.space import Arch, ArchStats, Family, SpaceError, SpaceSpec, arch_from_config, enumerate_space, stats, tier_arch
from mobilemoe.scaling.sweep import RunTable, SweepError, SweepPoint, parse_grid, recipe_train_one, run_sweep

__all__ = ["Arch", "ArchStats", "DeviceProfile", "Family", "Law", "LawError", "LawParams", "PlanError", "PlanResult",
           "ProfileError", "Run", "RunTable", "SpaceError", "SpaceSpec", "SweepError", "SweepPoint", "arch_from_config",
           "default_law", "enumerate_space", "evaluate_space", "fit_family", "fit_law", "fit_table", "get_profile",
           "list_profiles", "load_law", "load_profile", "parse_grid", "plan", "plot_frontier", "project_speed",
           "read_runs", "recipe_train_one", "run_sweep", "stats", "synthetic_runs", "tier_arch", "tier_comparison",
           "tier_fit"]
