"""ReMoE: router-only fine-tuning for expert reuse (ICML 2026, arXiv 2605.27081), plus routing traces,
expert-cache simulation and a storage device model.

Public API::

    from mobilemoe.remoe import load_adapter, wrap_model            # adapters (MobileMoE + transformers MoE)
    from mobilemoe.remoe import LossWeights, remoe_loss             # the objective (losses.py)
    from mobilemoe.remoe import RemoeTrainConfig, RemoeTrainer      # router-only training
    from mobilemoe.remoe import save_delta, load_delta, apply_delta # router delta files
    from mobilemoe.remoe import Trace, trace_sequences, trace_generation
    from mobilemoe.remoe import analyze, simulate_layer, eor        # cache simulator
    from mobilemoe.remoe import PROFILES, projected_tpot_ms, ExpertStore, write_expert_store
    from mobilemoe.remoe import evaluate, compare
"""

from mobilemoe.remoe.adapters import (HF_FAMILIES, Adapter, AdapterError, HFAdapter, MobileMoEAdapter,
                                      load_adapter, wrap_model)
from mobilemoe.remoe.cache_sim import (POLICIES, CacheReport, CacheStats, analyze, eor, plot_heatmap,
                                       simulate_groups, simulate_layer, simulate_shared)
from mobilemoe.remoe.device import (PROFILES, ExpertStore, StorageProfile, measure_local_disk, miss_profile,
                                    projected_tpot_ms, write_expert_store)
from mobilemoe.remoe.evaluate import compare, evaluate, expert_bytes, perplexity
from mobilemoe.remoe.losses import (LayerRouting, LossWeights, lag_loss, remoe_loss, reuse_loss, reuse_rate,
                                    router_probs, smooth_loss, sym_kl, trust_loss, working_set_loss)
from mobilemoe.remoe.traces import Trace, trace_generation, trace_sequences
from mobilemoe.remoe.train import (DELTA_FILE, RemoeTrainConfig, RemoeTrainer, RemoeTrainResult, apply_delta,
                                   load_delta, save_delta, verify_frozen)

__all__ = [n for n in dir() if not n.startswith("_")]
