"""Greedy decoding of an exported Nemotron-Flash model with one captured CUDA graph for every decode step.

The model is the Hugging Face one (``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` on an
export, or :class:`megatron_flash.hf.modeling_nemotron_flash.NemotronFlashForCausalLM`), decoding into its static
cache (``model.make_static_cache``):

1. :func:`prefill`: the prompt runs eagerly through the cache (fla's chunk kernel for DeltaNet on CUDA unless
   ``NEMOTRON_FLASH_DISABLE_FLA=1``); its last logits give the first new token.
2. :func:`decode`: one decode step (forward of one token per row, argmax, the token written into the output and
   fed back) reads and writes only tensors that live as long as the generation, and the cache's position is a device
   tensor. On CUDA the first ``warmup_steps`` steps run eagerly on a side stream (lazy initialization, cuBLAS
   workspaces, the cached output-row norms), one step is captured in a ``torch.cuda.CUDAGraph`` and the remaining
   steps are replays of it; the host only launches the graph. Without CUDA (or ``use_cuda_graph=False``) every
   step runs eagerly: the same function, so CPU tests check what the graph replays.

Generation has a fixed length (no stop at EOS), as in the decode-speed protocol; :func:`greedy_generate` does both
parts. :func:`run_steps` is the model-independent part (warm-up, capture, replay, timing); the benchmark uses it for
transformers' models too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass
class StepTiming:
    """How ``num_steps`` calls of a step function ran."""

    num_steps: int
    eager_steps: int  # warm-up steps (or every step without a graph)
    graph_steps: int  # replays of the captured step
    total_s: float  # wall seconds of everything (warm-up, capture, replays), device synchronized
    graph_s: float  # seconds of the replays alone (CUDA events); 0 without a graph
    capture_s: float  # wall seconds of the capture
    cuda_graph: bool
    warmup_s: float = 0.0  # wall seconds of the eager warm-up steps before a capture (a compilation lands here)

    @property
    def ms_per_step(self) -> float:
        """Per step: over the replays when there are any (the steady state), else over every step."""
        if self.graph_steps:
            return 1000.0 * self.graph_s / self.graph_steps
        return 1000.0 * self.total_s / max(1, self.num_steps)

    def to_dict(self) -> dict:
        return {"num_steps": self.num_steps, "eager_steps": self.eager_steps, "graph_steps": self.graph_steps,
                "total_s": self.total_s, "graph_s": self.graph_s, "capture_s": self.capture_s,
                "warmup_s": self.warmup_s, "cuda_graph": self.cuda_graph, "ms_per_step": self.ms_per_step}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(step: Callable[[], None], num_steps: int, device: torch.device, use_cuda_graph: bool = True,
              warmup_steps: int = 2) -> StepTiming:
    """Call ``step`` (which advances its own state in place) ``num_steps`` times.

    On CUDA with ``use_cuda_graph``: ``warmup_steps`` real steps on a side stream, then one step captured (a
    capture records kernels without running them) and replayed for the remaining ``num_steps - warmup_steps``
    steps, as in torch's CUDA-graph documentation. Otherwise every step runs eagerly.
    """
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}")
    device = torch.device(device)
    graphed = use_cuda_graph and device.type == "cuda" and num_steps > warmup_steps
    if graphed and warmup_steps < 1:
        # Lazy work of a first call (allocations outside the graph's pool, cached constants, cuBLAS handles)
        # must not happen inside the capture.
        raise ValueError("CUDA-graph capture needs warmup_steps >= 1")
    _synchronize(device)
    start = time.perf_counter()
    if not graphed:
        for _ in range(num_steps):
            step()
        _synchronize(device)
        return StepTiming(num_steps, num_steps, 0, time.perf_counter() - start, 0.0, 0.0, False)

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup_steps):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    _synchronize(device)
    capture_start = time.perf_counter()
    warmup_s = capture_start - start
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    _synchronize(device)
    capture_s = time.perf_counter() - capture_start
    replays = num_steps - warmup_steps
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    _synchronize(device)
    total_s = time.perf_counter() - start
    graph_s = begin.elapsed_time(end) / 1000.0
    del graph
    return StepTiming(num_steps, warmup_steps, replays, total_s, graph_s, capture_s, True, warmup_s)


@dataclass
class DecodeResult:
    """Greedy tokens of a generation and how long its parts took."""

    tokens: torch.Tensor  # [B, new_tokens]: the first from the prompt's logits, the rest from decode steps
    logits: Optional[torch.Tensor]  # [B, new_tokens, vocab] fp32, when asked for
    prefill_s: float
    steps: StepTiming  # the new_tokens - 1 decode steps

    @property
    def ms_per_token(self) -> float:
        return self.steps.ms_per_step

    def to_dict(self) -> dict:
        return {"batch": self.tokens.shape[0], "new_tokens": self.tokens.shape[1], "prefill_s": self.prefill_s,
                "ms_per_token": self.ms_per_token, **{f"decode_{k}": v for k, v in self.steps.to_dict().items()}}


def _check_static_cache(model, cache) -> None:
    if type(cache).__name__ != "NemotronFlashStaticCache" or not hasattr(model, "make_static_cache"):
        raise TypeError(f"graph decoding needs a Nemotron-Flash model and its static cache "
                        f"(model.make_static_cache), got {type(model).__name__} and {type(cache).__name__}")


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor, cache) -> torch.Tensor:
    """Run the prompt ``input_ids`` [B, T] through ``cache`` (eager); returns its last logits [B, vocab] (fp32)."""
    _check_static_cache(model, cache)
    return model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]


@torch.no_grad()
def decode(model, cache, first_tokens: torch.Tensor, new_tokens: int, use_cuda_graph: bool = True,
           warmup_steps: int = 2, keep_logits: bool = False, first_logits: Optional[torch.Tensor] = None,
           prefill_s: float = 0.0, compile_step: bool = False) -> DecodeResult:
    """Greedy decoding of ``new_tokens`` tokens whose first, ``first_tokens`` [B, 1], is already known (from the
    prompt's logits): ``new_tokens - 1`` decode steps through ``cache``, replayed from one CUDA graph on CUDA.

    The model's input projections are packed first (``model.pack_projections()``: one matrix-vector product per
    layer where there were two to four; values and memory unchanged).
    ``keep_logits`` also returns every step's logits (``first_logits`` [B, vocab] fills the first row).
    ``compile_step`` runs the model's one-token forward through ``torch.compile`` (Inductor fuses its many small
    kernels; compiled during the first warm-up step, so that step takes as long as the compilation), then captures
    the compiled step like the eager one.
    """
    _check_static_cache(model, cache)
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    if first_tokens.shape != (cache.batch_size, 1):
        raise ValueError(f"first_tokens must be [{cache.batch_size}, 1] (the cache's batch), got "
                         f"{list(first_tokens.shape)}")
    if cache.is_empty:
        raise ValueError("decode() continues a prefilled cache: run prefill() (or a forward) first")
    needed = cache.get_seq_length() + new_tokens - 1
    if needed > cache.max_length:
        raise ValueError(f"the cache holds {cache.max_length} text tokens; this generation needs {needed}")
    # Fewer, larger matrix-vector products per step; memory and values unchanged. Folders exported before the
    # method existed carry modeling code without it: they decode unpacked.
    pack = getattr(model, "pack_projections", None)
    if pack is not None:
        pack()
    device = first_tokens.device
    batch = first_tokens.shape[0]
    tokens = first_tokens.clone()
    generated = torch.empty(batch, new_tokens, dtype=torch.long, device=device)
    generated[:, :1] = first_tokens
    step_index = torch.ones(1, dtype=torch.long, device=device)  # the column the next step writes
    all_logits = None
    if keep_logits:
        all_logits = torch.zeros(batch, new_tokens, model.config.vocab_size, dtype=torch.float32, device=device)
        if first_logits is not None:
            all_logits[:, 0] = first_logits

    def forward_token() -> torch.Tensor:
        return model(input_ids=tokens, past_key_values=cache, use_cache=True).logits[:, -1]

    if compile_step:
        model.output_row_inverse_norms()  # computed eagerly here: the compiled step takes them as a constant
        forward_token = torch.compile(forward_token, dynamic=False)

    def step():
        logits = forward_token()
        next_tokens = logits.argmax(-1, keepdim=True)
        generated.index_copy_(1, step_index, next_tokens)
        if all_logits is not None:
            all_logits.index_copy_(1, step_index, logits.unsqueeze(1).float())
        step_index.add_(1)
        tokens.copy_(next_tokens)

    timing = run_steps(step, new_tokens - 1, device, use_cuda_graph=use_cuda_graph, warmup_steps=warmup_steps)
    return DecodeResult(generated, all_logits, prefill_s, timing)


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, new_tokens: int, use_cuda_graph: bool = True,
                    warmup_steps: int = 2, keep_logits: bool = False, cache=None,
                    compile_step: bool = False) -> DecodeResult:
    """Prefill ``input_ids`` [B, T] into a static cache (``cache``, reset first, or a new one sized for this
    generation) and decode ``new_tokens`` tokens greedily; see :func:`decode`."""
    batch, prompt_length = input_ids.shape
    if cache is None:
        cache = model.make_static_cache(batch, prompt_length + new_tokens)
    else:
        _check_static_cache(model, cache)
        cache.reset()
    _synchronize(input_ids.device)
    start = time.perf_counter()
    logits = prefill(model, input_ids, cache)
    first = logits.argmax(-1, keepdim=True)
    _synchronize(input_ids.device)
    prefill_s = time.perf_counter() - start
    return decode(model, cache, first, new_tokens, use_cuda_graph=use_cuda_graph, warmup_steps=warmup_steps,
                  keep_logits=keep_logits, first_logits=logits, prefill_s=prefill_s, compile_step=compile_step)
