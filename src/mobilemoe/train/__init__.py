"""Training: the loop (:mod:`.trainer`), LR schedules (:mod:`.schedule`), MoE balancing
(:mod:`.balance`), batch sources (:mod:`.data`), DDP/FSDP2 (:mod:`.distributed`), YAML recipes
(:mod:`.recipe`) and the stage chain behind ``mobilemoe train`` (:mod:`.run`)."""

from mobilemoe.train.balance import (AuxFreeBalancer, count_spread, expert_counts, load_balancing_loss,
                                     router_z_loss)
from mobilemoe.train.data import IGNORE_INDEX, BatchSource, ByteTokenizer, TokenWindowSource, pack_documents
from mobilemoe.train.distributed import DistInfo, init_distributed, wrap_model
from mobilemoe.train.recipe import DataSpec, ModelSpec, Recipe, RecipeError, StageSpec, load_recipe, recipe_from_dict
from mobilemoe.train.run import LoaderSource, StageReport, run_recipe
from mobilemoe.train.schedule import SCHEDULES, lr_at
from mobilemoe.train.trainer import TrainConfig, Trainer, TrainingError, TrainResult, build_optimizer

__all__ = [
    "IGNORE_INDEX", "SCHEDULES", "AuxFreeBalancer", "BatchSource", "ByteTokenizer", "DataSpec", "DistInfo",
    "LoaderSource", "ModelSpec", "Recipe", "RecipeError", "StageReport", "StageSpec", "TokenWindowSource",
    "TrainConfig", "TrainResult", "Trainer", "TrainingError", "build_optimizer", "count_spread", "expert_counts",
    "init_distributed", "load_balancing_loss", "load_recipe", "lr_at", "pack_documents", "recipe_from_dict",
    "router_z_loss", "run_recipe", "wrap_model",
]
