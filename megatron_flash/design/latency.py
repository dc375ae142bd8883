"""Decode latency of Nemotron-Flash configurations, and a per-operator lookup table that predicts it.

What is timed is one *decode step*: one new token per sequence through the whole model with its caches (DeltaNet
and Mamba2 conv + recurrent states, attention KV cache), using the Hugging Face modeling code
(megatron_flash/hf/modeling_nemotron_flash.py, which has the decode path; the Megatron mixers have none), built
from a pattern and widths (:class:`megatron_flash.design.space.WidthRule`) with random weights.

* On a GPU the step is captured once in a CUDA graph and replayed (``cuda_graphs=True``): the graph reads a cache
  filled to a fixed context and never advances it, so every replay costs one step at that context. The context is
  the middle of the generation (meta tokens + prompt + new_tokens / 2); attention's cost is linear in the context,
  so N x (step at the middle) is the cost of generating N tokens.
* Without CUDA (tests, CPU) the same steps run eagerly (``cuda_graphs=False``), the cache advancing normally,
  starting ``timed_steps / 2`` tokens before the middle.

Lookup table: for every operator (D, M, A, S, F) and width, models of ``k`` and ``2k`` layers of that operator alone
are timed; the operator costs ``(t(2k) - t(k)) / k`` and the rest of ``t(k)`` is the fixed cost (embedding, final
norm, output layer, launch overhead), taken as the median over operators. A pattern's prediction is
``base(w) + sum over its layers of op(w)``, interpolated linearly between measured widths. ``validate`` measures
whole models directly and reports the prediction error.
"""

from __future__ import annotations

import bisect
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

from megatron_flash import patterns
from megatron_flash.design.space import WidthRule

TABLE_FORMAT = "megatron_flash.latency_table/1"
OPERATORS = ("D", "M", "A", "S", "F")


class LatencyError(ValueError):
    """A table that cannot answer the question (missing operator, width out of range, unreadable file)."""


# --------------------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def parse_dtype(name: str) -> torch.dtype:
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if name not in table:
        raise LatencyError(f"dtype {name!r}: use bf16, fp16 or fp32")
    return table[name]


def build_model(rule: WidthRule, pattern: str, hidden: int, dtype: torch.dtype, device: torch.device):
    """Nemotron-Flash (HF modeling code) with random weights for this pattern and hidden size, in eval mode."""
    from megatron_flash.hf.modeling_nemotron_flash import NemotronFlashForCausalLM

    config = rule.hf_config(pattern, hidden)
    with torch.device(device):
        model = NemotronFlashForCausalLM(config)
    return model.to(dtype=dtype).eval()


@dataclass
class DecodeSetting:
    """What a decode step is timed at: batch, prompt, generation length (sets the context), timing effort."""

    batch: int = 1
    prompt_length: int = 1
    new_tokens: int = 256
    timed_steps: int = 32
    repeats: int = 5
    warmup: int = 1
    cuda_graphs: bool = True

    def context(self, num_meta_tokens: int) -> int:
        """Tokens in the cache when a step is timed (CUDA-graph mode): meta + prompt + half the generation."""
        return num_meta_tokens + self.prompt_length + self.new_tokens // 2


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _snapshot(cache) -> dict:
    return {"key_cache": list(cache.key_cache), "value_cache": list(cache.value_cache),
            "first_cached_key_index": list(cache.first_cached_key_index), "conv_states": list(cache.conv_states),
            "recurrent_states": list(cache.recurrent_states), "text_length": cache.text_length,
            "stream_length": cache.stream_length}


def _restore(cache, snapshot: dict) -> None:
    for name, value in snapshot.items():
        setattr(cache, name, list(value) if isinstance(value, list) else value)


@torch.no_grad()
def _prefill(model, setting: DecodeSetting, length: int, device: torch.device, seed: int = 0):
    """Caches of ``setting.batch`` sequences of ``length`` tokens, and each one's next token.

    One sequence is prefilled and its caches copied to every batch row (decode cost does not depend on the
    values; prefilling a large batch at a long context at once would need far more memory than decoding it).
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(model.config.vocab_size, (1, max(1, length)), generator=gen).to(device)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    if setting.batch > 1:
        cache.reorder_cache(torch.zeros(setting.batch, dtype=torch.long, device=device))
        token = token.expand(setting.batch, 1).contiguous()
    return cache, token


@torch.no_grad()
def decode_step_ms(model, setting: DecodeSetting, device: Optional[torch.device] = None) -> float:
    """Median milliseconds of one decode step (all ``batch`` sequences advance one token) of ``model``."""
    device = device or next(model.parameters()).device
    use_graphs = setting.cuda_graphs and device.type == "cuda"
    if use_graphs:
        return _graph_step_ms(model, setting, device)
    start = max(1, setting.prompt_length + setting.new_tokens // 2 - setting.timed_steps // 2)
    times = []
    for run in range(setting.warmup + setting.repeats):
        cache, token = _prefill(model, setting, start, device, seed=run)
        _synchronize(device)
        t0 = time.perf_counter()
        for _ in range(setting.timed_steps):
            token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        _synchronize(device)
        if run >= setting.warmup:
            times.append((time.perf_counter() - t0) * 1000 / setting.timed_steps)
    return statistics.median(times)


def _graph_step_ms(model, setting: DecodeSetting, device: torch.device) -> float:
    cache, token = _prefill(model, setting, setting.prompt_length + setting.new_tokens // 2, device)
    static_token = token.clone()
    snapshot = _snapshot(cache)  # the captured step reads these tensors; keeping them here keeps them alive

    def step():
        logits = model(input_ids=static_token, past_key_values=cache, use_cache=True).logits
        _restore(cache, snapshot)  # the step's new states are dropped: every replay is the same step
        return logits

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(max(2, setting.warmup)):  # allocator, cuBLAS workspaces, Triton autotuning
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    times = []
    for run in range(setting.warmup + setting.repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(setting.timed_steps):
            graph.replay()
        end.record()
        torch.cuda.synchronize(device)
        if run >= setting.warmup:
            times.append(begin.elapsed_time(end) / setting.timed_steps)
    del graph
    return statistics.median(times)


def measure_model(rule: WidthRule, pattern: str, hidden: int, setting: DecodeSetting, dtype: torch.dtype,
                  device: torch.device) -> float:
    """Decode-step milliseconds of a freshly built model (freed afterwards)."""
    model = build_model(rule, pattern, hidden, dtype, device)
    try:
        return decode_step_ms(model, setting, device)
    finally:
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


def warm_up(rule: WidthRule, width: int, dtype: torch.dtype, device: torch.device) -> None:
    """One untimed measurement of a small model, so that one-time costs (kernel selection, allocator growth,
    lazy initialization) do not land in the first real measurement."""
    measure_model(rule, "F", width, DecodeSetting(new_tokens=4, timed_steps=2, repeats=1, warmup=1,
                                                  cuda_graphs=False), dtype, device)


def throughput_tokens_per_s(rule: WidthRule, pattern: str, hidden: int, setting: DecodeSetting,
                            dtype: torch.dtype, device: torch.device) -> float:
    """Generated tokens per second at ``setting.batch`` sequences (large-batch throughput)."""
    return setting.batch * 1000.0 / measure_model(rule, pattern, hidden, setting, dtype, device)


# --------------------------------------------------------------------------------------------------------------
# Lookup table
# --------------------------------------------------------------------------------------------------------------


def _interpolate(xs: list, ys: list, x: float) -> float:
    """Piecewise linear through (xs, ys), extended linearly past the ends (never below 0)."""
    if len(xs) == 1:
        if x != xs[0]:
            raise LatencyError(f"the table has one width ({xs[0]}); cannot predict width {x}")
        return ys[0]
    i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


@dataclass
class LatencyTable:
    """Milliseconds per decode step of each operator (and the fixed part) at each measured width."""

    device: str
    dtype: str
    widths: list
    ops: dict  # operator char -> ms per layer, one per width
    base: list  # ms of everything else (embedding, final norm, output layer, launch), one per width
    width_rule: dict
    setting: dict
    layers_per_measurement: int = 4
    created: str = ""
    torch_version: str = ""
    validation: list = field(default_factory=list)

    # -- prediction ---------------------------------------------------------------------------------------

    @property
    def rule(self) -> WidthRule:
        return WidthRule(**self.width_rule)

    def op_ms(self, op: str, hidden: int) -> float:
        if op not in self.ops:
            raise LatencyError(f"operator {op!r} ({patterns.LAYER_TYPES.get(op, '?')}) is not in the latency table "
                               f"(it has {', '.join(sorted(self.ops))}); measure it with --operators")
        return _interpolate(self.widths, self.ops[op], hidden)

    def base_ms(self, hidden: int) -> float:
        return _interpolate(self.widths, self.base, hidden)

    def breakdown(self, pattern: str, hidden: int) -> dict:
        """{operator: ms of all its layers, 'base': ms} for this pattern at this width."""
        layers = patterns.parse(pattern)
        out = {"base": self.base_ms(hidden)}
        for op in sorted(set(layers)):
            out[op] = layers.count(op) * self.op_ms(op, hidden)
        return out

    def predict(self, pattern: str, hidden: int) -> float:
        """Predicted milliseconds per decode step of the model (pattern, hidden) under this table's setting."""
        return sum(self.breakdown(pattern, hidden).values())

    def predict_generation_ms(self, pattern: str, hidden: int) -> float:
        """Predicted milliseconds to generate the table's ``new_tokens`` tokens (steps x step cost)."""
        return self.setting["new_tokens"] * self.predict(pattern, hidden)

    def covers(self, hidden: int) -> bool:
        return self.widths[0] <= hidden <= self.widths[-1]

    # -- files ---------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"format": TABLE_FORMAT, **asdict(self)}

    def save(self, path: str) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: dict) -> "LatencyTable":
        if data.get("format") != TABLE_FORMAT:
            raise LatencyError(f"not a latency table (format {data.get('format')!r}, expected {TABLE_FORMAT!r})")
        fields = {k: v for k, v in data.items() if k != "format"}
        table = cls(**fields)
        table.widths = [int(w) for w in table.widths]
        if sorted(table.widths) != table.widths or len(set(table.widths)) != len(table.widths):
            raise LatencyError(f"latency table widths {table.widths} are not increasing")
        for op, values in table.ops.items():
            if len(values) != len(table.widths):
                raise LatencyError(f"operator {op}: {len(values)} values for {len(table.widths)} widths")
        return table

    @classmethod
    def load(cls, path: str) -> "LatencyTable":
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise LatencyError(f"latency table {path}: no such file (make one with tools/profile_latency.py "
                               f"table)") from None
        except json.JSONDecodeError as exc:
            raise LatencyError(f"latency table {path}: not JSON ({exc})") from None
        try:
            return cls.from_dict(data)
        except TypeError as exc:
            raise LatencyError(f"latency table {path}: {exc}") from None


def merge_tables(tables: list) -> LatencyTable:
    """One table from tables of the same device, dtype, setting, operators and width rule at different widths."""
    if not tables:
        raise LatencyError("nothing to merge")
    first = tables[0]
    for t in tables[1:]:
        mismatch = _compatibility_error(first, t)
        if mismatch:
            raise LatencyError(f"cannot merge tables with {mismatch}")
    columns = {}
    for t in tables:
        for i, w in enumerate(t.widths):
            if w in columns:
                raise LatencyError(f"width {w} is in more than one table")
            columns[w] = ({op: v[i] for op, v in t.ops.items()}, t.base[i])
    widths = sorted(columns)
    return LatencyTable(
        device=first.device, dtype=first.dtype, widths=widths,
        ops={op: [columns[w][0][op] for w in widths] for op in first.ops}, base=[columns[w][1] for w in widths],
        width_rule=first.width_rule, setting=first.setting, layers_per_measurement=first.layers_per_measurement,
        created=max(t.created for t in tables), torch_version=first.torch_version,
        validation=[row for t in tables for row in t.validation])


def write_json_atomic(path: str, data) -> None:
    """Write JSON to a temporary file in the same folder, fsync, then rename over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_" + os.path.basename(path), dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _compatibility_error(a: LatencyTable, b: LatencyTable) -> Optional[str]:
    """Why tables a and b cannot be joined (None when they can): they must share device, dtype, setting,
    width rule and operators."""
    for name in ("device", "dtype", "setting", "width_rule", "layers_per_measurement"):
        if getattr(a, name) != getattr(b, name):
            return f"different {name}: {getattr(a, name)!r} vs {getattr(b, name)!r}"
    if set(a.ops) != set(b.ops):
        return f"different operators: {sorted(a.ops)} vs {sorted(b.ops)}"
    return None


def measure_table(rule: WidthRule, widths, operators=("D", "M", "A", "F"), setting: Optional[DecodeSetting] = None,
                  dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None,
                  layers_per_measurement: int = 4, progress: Callable[[str], None] = print,
                  resume_from: Optional[LatencyTable] = None,
                  on_width: Optional[Callable[[LatencyTable], None]] = None) -> LatencyTable:
    """Time every operator at every width (2 models each) and build the table.

    ``on_width(table so far)`` is called after each width, so a caller can save partial work; ``resume_from`` (a
    partial table of the same device, dtype, setting, rule and operators) supplies widths already measured.
    """
    setting = setting or DecodeSetting()
    device = device or default_device()
    widths = sorted(set(int(w) for w in widths))
    k = layers_per_measurement
    if k < 1:
        raise LatencyError("layers_per_measurement must be >= 1")
    for op in operators:
        if op not in OPERATORS:
            raise LatencyError(f"operator {op!r}: choose from {', '.join(OPERATORS)}")
        if op == "S" and not rule.sliding_window:
            raise LatencyError("operator S (sliding-window attention) needs a sliding window (--sliding-window)")
    for w in widths:
        rule.check(w)
    columns = {}  # width -> ({op: ms per layer}, base ms)

    def table() -> LatencyTable:
        done = sorted(columns)
        return LatencyTable(
            device=device_name(device), dtype=str(dtype).replace("torch.", ""), widths=done,
            ops={op: [columns[w][0][op] for w in done] for op in operators}, base=[columns[w][1] for w in done],
            width_rule=rule.to_dict(), setting={**asdict(setting),
                                                "cuda_graphs": setting.cuda_graphs and device.type == "cuda",
                                                "context": setting.context(rule.num_meta_tokens)},
            layers_per_measurement=k, created=datetime.datetime.now().isoformat(timespec="seconds"),
            torch_version=torch.__version__)

    if resume_from is not None:
        mismatch = _compatibility_error(table(), resume_from)
        if mismatch:
            raise LatencyError(f"cannot resume from a partial table with {mismatch}")
        for i, w in enumerate(resume_from.widths):
            if w in widths:
                columns[w] = ({op: v[i] for op, v in resume_from.ops.items()}, resume_from.base[i])
        if columns:
            progress(f"[latency] resuming: widths {sorted(columns)} already measured")
    todo = [w for w in widths if w not in columns]
    if todo:
        warm_up(rule, todo[0], dtype, device)
    for w in todo:
        per_op, estimates = {}, []
        for op in operators:
            t0 = time.perf_counter()
            single = measure_model(rule, op * k, w, setting, dtype, device)
            double = measure_model(rule, op * (2 * k), w, setting, dtype, device)
            per_op[op] = max(0.0, (double - single) / k)
            estimates.append(single - k * per_op[op])
            progress(f"[latency] width {w:5d} | {op} ({patterns.LAYER_TYPES[op]:>8s}) | {per_op[op]:8.4f} ms/layer | "
                     f"{k} layers {single:8.3f} ms, {2 * k} layers {double:8.3f} ms | "
                     f"{time.perf_counter() - t0:5.1f} s")
        columns[w] = (per_op, max(0.0, statistics.median(estimates)))
        progress(f"[latency] width {w:5d} | fixed part (embedding, norm, output layer, launch) {columns[w][1]:.4f} ms")
        if on_width is not None:
            on_width(table())
    return table()


def validate(table: LatencyTable, cases, dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None,
             progress: Callable[[str], None] = print) -> list:
    """Measure each (pattern, hidden) directly and compare with the table's prediction.

    Returns rows {pattern, hidden, predicted_ms, measured_ms, error} (error = predicted / measured - 1) and stores
    them in ``table.validation``.
    """
    device = device or default_device()
    dtype = dtype or parse_dtype(table.dtype)
    setting_fields = {k: v for k, v in table.setting.items() if k in DecodeSetting.__dataclass_fields__}
    setting = DecodeSetting(**setting_fields)
    rows = []
    if cases:
        warm_up(table.rule, min(h for _, h in cases), dtype, device)
    for pattern, hidden in cases:
        predicted = table.predict(pattern, hidden)
        measured = measure_model(table.rule, pattern, hidden, setting, dtype, device)
        error = predicted / measured - 1 if measured > 0 else float("nan")
        rows.append({"pattern": patterns.parse(pattern), "hidden": hidden, "predicted_ms": predicted,
                     "measured_ms": measured, "error": error})
        progress(f"[latency] check {patterns.parse(pattern)} @ {hidden}: predicted {predicted:.4f} ms, measured "
                 f"{measured:.4f} ms, error {error:+.1%}")
    table.validation = rows
    return rows
