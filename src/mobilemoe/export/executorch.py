"""MobileMoE -> ExecuTorch ``.pte`` (torch.export -> XNNPACK partitioner), optionally 8da4w.

The exported program is the reference :class:`~mobilemoe.model.MobileMoEForCausalLM` itself with the
few pieces that cannot be exported swapped for export-friendly ones (gpt-fast style); norms, RoPE,
QK-norm, attention, routing math and SwiGLU run the model's own code:

* KV cache -> :class:`StaticKVCache`: the model's ``KVCache`` interface over registered buffers
  that the program mutates in place (``index_copy_`` at ``input_pos + arange(T)``), so the cache
  lives inside the loaded method between calls. Attention runs over the whole cache with the mask
  ``key_pos <= query_pos``, which also hides the unwritten slots.
* Router top-k -> :func:`mobilemoe.moe.select_topk_static`: the same rule (ties to the lower
  index) without a sort, which ExecuTorch has no kernel for.
* Expert dispatch: the model groups tokens by expert (argsort + per-expert slices), whose shapes
  depend on the data. Swapped for :class:`GatheredExperts` (fp32: gathers the k chosen experts'
  weights per token and runs the model's expert SwiGLU on them as batched matmuls, so decode reads
  k experts, not E) or :class:`DenseExperts` (8da4w: every expert as the model's ``SwiGLU`` of
  ``nn.Linear`` layers, which torchao quantizes and XNNPACK lowers; each expert's output is scaled
  by its combine weight, zero where a token did not choose it, so it costs E/k times the routed
  FLOPs).
* Tied output head -> an ``nn.Linear`` copy of the embedding, so 8da4w quantizes it while the
  embedding lookup stays fp32. Routers stay fp32 and unquantized, as in the checkpoint format.

``forward(tokens [1, T] int64, input_pos [1] int64) -> logits [1, T, V]`` accepts any T eagerly, but
with executorch 1.5.1 lowering specialises a dynamic length to the example's size, so the ``.pte``
holds fixed-length methods over one shared cache (``share_mutable_buffers``): ``forward`` (T = 1,
decode) and, with ``prefill_chunk`` > 1, ``prefill`` (T = prefill_chunk). :class:`PteRunner` feeds a
prompt in whole chunks, then the rest one token per call.

8da4w (int8 dynamic per-token activations, int4 symmetric group-32 weights) re-quantizes the decoded
weights with torchao's own scales, so its logits differ from the fp32 model by quantization error;
``quantize=None`` exports fp32 and matches the eager model to float rounding.

Tested with executorch 1.5.1 + torchao 0.18.0 (installed ``--no-deps``) beside torch 2.13.0; they
need ``ruamel.yaml`` and ``flatbuffers`` at import.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from mobilemoe.config import MobileMoEConfig
from mobilemoe.errors import MobileMoEError
from mobilemoe.export.common import ExportError
from mobilemoe.model import MobileMoEForCausalLM
from mobilemoe.moe import MoEBlock, StackedExperts, SwiGLU, select_topk_static
from mobilemoe.quant.int4 import GROUP_SIZE
from mobilemoe.utils import atomic_path


def _require() -> None:
    try:
        import executorch  # noqa: F401
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner  # noqa: F401
    except ImportError as exc:
        raise MobileMoEError(f"ExecuTorch is not importable ({exc}): pip install --no-deps executorch==1.5.1 "
                             "torchao==0.18.0 ruamel.yaml flatbuffers") from None


class StaticKVCache(nn.Module):
    """:class:`mobilemoe.model.KVCache`'s interface with ``start`` a [1] tensor, over buffers
    ``k_cache_{layer}`` / ``v_cache_{layer}`` [1, n_kv, max_len, D] that the program mutates."""

    def __init__(self, cfg: MobileMoEConfig, max_len: int) -> None:
        super().__init__()
        self.max_len = max_len
        shape = (1, cfg.num_key_value_heads, max_len, cfg.head_dim)
        for i in range(cfg.num_hidden_layers):
            self.register_buffer(f"k_cache_{i}", torch.zeros(shape), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(shape), persistent=False)

    def update(self, layer: int, start: torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        positions = start + torch.arange(k.shape[2])
        k_cache, v_cache = getattr(self, f"k_cache_{layer}"), getattr(self, f"v_cache_{layer}")
        k_cache.index_copy_(2, positions, k)
        v_cache.index_copy_(2, positions, v)
        return k_cache, v_cache

    def attention_mask(self, start: torch.Tensor, T: int, S: int, device: torch.device
                       ) -> tuple[torch.Tensor, bool]:
        # every query sees the keys up to its own position; later (maybe unwritten) slots are hidden
        positions = start + torch.arange(T, device=device)
        return torch.arange(S, device=device)[None, :] <= positions[:, None], False

    def reset(self) -> None:
        for buf in self.buffers():
            buf.zero_()


class GatheredExperts(StackedExperts):
    """The model's experts, dispatched by gathering each token's k chosen experts' weights: static
    shapes, and only chosen experts are read. The gathered copies hold N*k experts, so this suits
    decode (N = 1) and short prefill chunks."""

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n_tokens, k = expert_ids.shape
        gate_up, down = self.expert_weights()
        flat = expert_ids.reshape(-1)
        chosen_gate_up = gate_up.index_select(0, flat).unflatten(0, (n_tokens, k))  # [N, k, H, 2I]
        chosen_down = down.index_select(0, flat).unflatten(0, (n_tokens, k))  # [N, k, I, H]
        y = self._swiglu(x[:, None, None, :], chosen_gate_up, chosen_down).squeeze(-2)  # [N, k, H]
        return (y * weights.unsqueeze(-1).to(x.dtype)).sum(1)


class DenseExperts(nn.Module):
    """The model's experts as per-expert :class:`SwiGLU` linears (quantizable), all run on every token."""

    def __init__(self, experts: StackedExperts) -> None:
        super().__init__()
        gate_up, down = experts.expert_weights()
        E, H, width = gate_up.shape[0], gate_up.shape[1], experts.width
        self.experts = nn.ModuleList(SwiGLU(H, width) for _ in range(E))
        with torch.no_grad():
            for e, mlp in enumerate(self.experts):  # y = x @ W (stacked) -> nn.Linear's [out, in]
                mlp.gate_proj.weight.copy_(gate_up[e, :, :width].t())
                mlp.up_proj.weight.copy_(gate_up[e, :, width:].t())
                mlp.down_proj.weight.copy_(down[e].t())

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        dense = x.new_zeros(x.shape[0], len(self.experts)).scatter(-1, expert_ids, weights.to(x.dtype))
        out = torch.zeros_like(x)
        for e, mlp in enumerate(self.experts):
            out = out + mlp(x) * dense[:, e:e + 1]
        return out


def _gathered(experts: StackedExperts) -> GatheredExperts:
    E, H, two_width = experts.gate_up_proj.shape
    with torch.device("meta"):
        new = GatheredExperts(E, H, two_width // 2)
    new.load_state_dict(experts.state_dict(), assign=True)
    return new


def swap_for_export(model: MobileMoEForCausalLM, experts: str = "gather") -> MobileMoEForCausalLM:
    """In place: export-friendly top-k and expert dispatch (``"gather"`` or ``"dense"``), untied head."""
    if experts not in ("gather", "dense"):
        raise ExportError(f"unknown expert dispatch {experts!r}: choose gather or dense")
    for layer in model.model.layers:
        block = layer.feed_forward
        if isinstance(block, MoEBlock):
            block.select = select_topk_static
            block.experts = _gathered(block.experts) if experts == "gather" else DenseExperts(block.experts)
    if model.lm_head is None:  # its own nn.Linear, so that 8da4w quantizes the head (not the lookup)
        weight = model.output_weight
        model.lm_head = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            model.lm_head.weight.copy_(weight)
    return model.requires_grad_(False)


class StaticMobileMoE(nn.Module):
    """Export entry point: ``forward(tokens [1, T], input_pos [1]) -> logits [1, T, V]`` over a
    :func:`swap_for_export`-ed model and a :class:`StaticKVCache`."""

    def __init__(self, model: MobileMoEForCausalLM, max_seq_len: int) -> None:
        super().__init__()
        self.model = model
        self.cache = StaticKVCache(model.config, max_seq_len)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        # MobileMoEForCausalLM.forward's body minus its Python-side checks and output dataclass
        cos, sin = self.model.rope_tables(input_pos, tokens.shape[1])
        x = self.model.model.embed_tokens(tokens)
        for layer in self.model.model.layers:
            x, _ = layer(x, cos, sin, input_pos, self.cache)
        return self.model.lm_head(self.model.model.norm(x))


def check_executorch(cfg: MobileMoEConfig) -> None:
    """Everything the reference model runs is representable; only the batch is fixed at 1."""
    if cfg.num_local_experts > 512:
        raise ExportError(f"cannot export to ExecuTorch: num_local_experts={cfg.num_local_experts} unrolled experts "
                          "would make an impractically large graph")


def build_static(ckpt: str | os.PathLike, max_seq_len: int = 256, experts: str = "gather") -> StaticMobileMoE:
    """Load ``ckpt`` in fp32 and wrap it for export (``experts``: see :func:`swap_for_export`)."""
    from mobilemoe.checkpoint import load_model

    model = load_model(ckpt, dtype=torch.float32).eval()
    check_executorch(model.config)
    max_seq_len = min(max_seq_len, model.config.max_position_embeddings)
    return StaticMobileMoE(swap_for_export(model, experts), max_seq_len).eval()


def quantize_8da4w(module: nn.Module, group_size: int = GROUP_SIZE) -> None:
    """torchao 8da4w in place on every nn.Linear except routers (int8 dynamic activations, int4 group weights)."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group_size))

    def keep(mod: nn.Module, fqn: str) -> bool:
        return isinstance(mod, nn.Linear) and not fqn.endswith("router") and mod.in_features % group_size == 0

    quantize_(module, config, filter_fn=keep)


PREFILL_CHUNK = 8  # tokens per prefill call; each extra method costs one more lowering at export


def export_executorch(ckpt: str | os.PathLike, out: str | os.PathLike, max_seq_len: int = 256,
                      quantize: str | None = "8da4w", prefill_chunk: int = PREFILL_CHUNK) -> Path:
    """Write ``out`` (.pte) from a checkpoint: torch.export -> XNNPACK -> ExecuTorch.
    ``quantize``: "8da4w" (torchao, int4 group-32 weights, dense experts) or None / "none" (fp32,
    gathered experts); ``prefill_chunk``: see :func:`export_module`."""
    _require()
    if quantize not in (None, "none", "8da4w"):
        raise ExportError(f"unknown ExecuTorch quantization {quantize!r}: choose 8da4w or none")
    # torchao quantizes nn.Linear modules only, so 8da4w needs the per-expert linears
    module = build_static(ckpt, max_seq_len, experts="dense" if quantize == "8da4w" else "gather")
    if quantize == "8da4w":
        quantize_8da4w(module)
    return export_module(module, out, min(prefill_chunk, module.cache.max_len))


def export_module(module: StaticMobileMoE, out: str | os.PathLike, prefill_chunk: int = 0) -> Path:
    """torch.export -> XNNPACK -> ``out`` (.pte) for an already built (maybe quantized) module:
    method ``forward`` takes one token, ``prefill`` (when ``prefill_chunk`` > 1) that many."""
    _require()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass

    # The cache's current contents become the program's initial state: start from zeros even if the
    # module was run eagerly before.
    module.cache.reset()
    lengths = {"forward": 1, **({"prefill": prefill_chunk} if prefill_chunk > 1 else {})}
    with torch.no_grad():
        programs = {name: torch.export.export(module, (torch.zeros(1, T, dtype=torch.long),
                                                       torch.zeros(1, dtype=torch.long)), strict=False)
                    for name, T in lengths.items()}
    edge = to_edge_transform_and_lower(programs, partitioner=[XnnpackPartitioner()])
    # the caches start as zeros (not "meaningless"): masked slots must not hold NaN garbage; and
    # both methods read and write the same cache
    prog = edge.to_executorch(ExecutorchBackendConfig(
        passes=[InitializedMutableBufferPass(["k_cache", "v_cache"])],
        memory_planning_pass=MemoryPlanningPass(share_mutable_buffers=True)))
    with atomic_path(out) as tmp:
        tmp.write_bytes(prog.buffer)
    return Path(out)


class PteRunner:
    """Run an exported ``.pte`` with ExecuTorch's Python runtime (the KV cache lives in the method)."""

    def __init__(self, path: str | os.PathLike) -> None:
        _require()
        from executorch.runtime import Runtime

        self.program = Runtime.get().load_program(Path(path))
        self.method = self.program.load_method("forward")
        self.prefill, self.chunk = None, 1
        if "prefill" in self.program.method_names:
            self.prefill = self.program.load_method("prefill")
            self.chunk = self.prefill.metadata.input_tensor_meta(0).sizes()[1]

    def _run(self, method, tokens: list[int], pos: int) -> torch.Tensor:
        out = method.execute([torch.tensor([tokens], dtype=torch.long), torch.tensor([pos], dtype=torch.long)])
        return out[0][0]

    def step(self, token: int, pos: int) -> torch.Tensor:
        """Logits [V] after feeding ``token`` at position ``pos``."""
        return self._run(self.method, [token], pos)[-1]

    def __call__(self, tokens: list[int], start_pos: int) -> torch.Tensor:
        """Logits [T, V] after each of ``tokens`` from ``start_pos``: whole prefill chunks, then one at a time."""
        n_chunked = len(tokens) // self.chunk * self.chunk if self.prefill is not None else 0
        parts = [self._run(self.prefill, tokens[i:i + self.chunk], start_pos + i)
                 for i in range(0, n_chunked, self.chunk)]
        parts += [self._run(self.method, [t], start_pos + i) for i, t in enumerate(tokens) if i >= n_chunked]
        return torch.cat(parts) if parts else torch.empty(0)
