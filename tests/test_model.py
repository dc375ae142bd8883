"""The Nemotron-Flash model on megatron-core: presets, patterns, and layout equivalence (TP, PP, SP)."""

import json
import os

import pytest
import torch

from megatron_flash import patterns, presets
from megatron_flash.testing import init_layout_invariant, run_distributed

LAYOUT_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "official_layout")
SEQ, BATCH = 20, 2


# --- patterns ---------------------------------------------------------------------------------------------------

def test_pattern_round_trip_with_released_layer_types():
    for name, preset in (("1b", presets.NEMOTRON_FLASH_1B_PATTERN), ("3b", presets.NEMOTRON_FLASH_3B_PATTERN)):
        path = os.path.join(LAYOUT_DIR, f"{name}_tied.json")
        if not os.path.exists(path):
            pytest.skip(f"{path} not present (the released layout lives in ../shared)")
        released = json.load(open(path))["config"]["layer_types"]
        types, global_idx = patterns.to_layer_types(preset)
        assert types == released and global_idx == []
        assert patterns.from_layer_types(released) == patterns.parse(preset)


def test_sliding_window_patterns_round_trip():
    types, global_idx = patterns.to_layer_types("SFAFDF")
    assert types == ["a", "f", "a", "f", "deltanet", "f"] and global_idx == [2]
    assert patterns.from_layer_types(types, sliding_window=128, global_attn_idx=global_idx) == "SFAFDF"


@pytest.mark.parametrize("bad,where", [("DFXF", "position 2"), ("", "no layers"), ("DF7", "position 2")])
def test_invalid_patterns_name_the_position(bad, where):
    with pytest.raises(patterns.PatternError, match=where):
        patterns.parse(bad)


def test_stage_boundaries_even_and_explicit():
    assert patterns.stage_boundaries(7, 2) == [(0, 4), (4, 7)]
    assert patterns.stage_boundaries(6, 2, patterns.explicit_stage_sizes("DF|MFAF")) == [(0, 2), (2, 6)]
    with pytest.raises(patterns.PatternError, match="pipeline size"):
        patterns.stage_boundaries(4, 3, [2, 2])
    with pytest.raises(patterns.PatternError, match="cannot fill"):
        patterns.stage_boundaries(2, 3)


# --- presets ----------------------------------------------------------------------------------------------------

def _count_params(preset):
    from megatron_flash.models import builder

    spec = builder.resolve(preset, use_cpu_initialization=False, perform_initialization=False,
                           params_dtype=torch.bfloat16)
    model = builder.build_model(spec, 4096)
    return sum(p.numel() for p in model.parameters())


def test_preset_parameter_counts_match_the_released_models():
    counts = run_distributed(_preset_counts, world_size=1)[0]
    assert counts == presets.RELEASED_PARAMETER_COUNTS


def _preset_counts():
    return {name: _count_params(name) for name in presets.RELEASED_PARAMETER_COUNTS}


# --- layouts ----------------------------------------------------------------------------------------------------

def _loss_and_grads(sequence_parallel):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_flash.models import builder, layout

    spec = builder.resolve("tiny", layer_pattern="DFMFSFAF", sliding_window=6, use_cpu_initialization=True,
                           sequence_parallel=sequence_parallel)
    model = builder.build_model(spec, SEQ)
    names = layout.global_names(model)
    init_layout_invariant(model, lambda n: names[n])
    tokens = torch.randint(0, spec.vocab_size, (2 * BATCH, SEQ + 1), generator=torch.Generator().manual_seed(3))
    # DDP + finalize_model_grads as in training: they sum sequence-parallel norm grads over TP ranks
    model = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    model.config.finalize_model_grads_func = finalize_model_grads

    def step(data, m):
        batch = next(data)
        out = m(batch[:, :-1], labels=batch[:, 1:])
        return out, lambda o: (o.float().mean(), {"loss": o.float().mean().detach().clone()})

    res = get_forward_backward_func()(forward_step_func=step, data_iterator=iter(tokens.chunk(2)), model=[model],
                                      num_microbatches=2, seq_length=SEQ + spec.config.num_meta_tokens,
                                      micro_batch_size=BATCH)
    loss = torch.stack([r["loss"] for r in res]).sum().item() if ps.is_pipeline_last_stage() else None
    return {"loss": loss, "grads": layout.full_named_tensors(model, use_grads=True),
            "first_of_stage": ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0}


def _merged(results):
    loss = next(r["loss"] for r in results if r["loss"] is not None)
    grads = {}
    for r in (r for r in results if r["first_of_stage"]):
        for k, v in r["grads"].items():
            grads[k] = v  # tied embeddings: finalize_model_grads gave both stages the summed gradient
    return loss, grads


@pytest.fixture(scope="module")
def single_process():
    return _merged(run_distributed(_loss_and_grads, world_size=1, args=(False,)))


@pytest.mark.parametrize("tp,pp,sp", [(2, 1, False), (1, 2, False), (2, 1, True)], ids=["tp2", "pp2", "tp2-sp"])
def test_layouts_give_the_same_loss_and_gradients(single_process, tp, pp, sp):
    ref_loss, ref_grads = single_process
    loss, grads = _merged(run_distributed(_loss_and_grads, world_size=tp * pp, tensor_model_parallel_size=tp,
                                          pipeline_model_parallel_size=pp, args=(sp,)))
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=name: f"gradient of {n}: {m}")


# --- the residual stream ----------------------------------------------------------------------------------------

def _stack_against_its_definition(recompute):
    """Loss and parameter gradients of the tiny model with HybridStack's forward (each layer's residual add done in
    the next norm's kernel), then with the stack replaced by its definition, h = h + mixer(norm(h)) per layer and
    the final norm; training mode, with or without full recomputation."""
    from megatron_flash.models import builder
    from megatron_flash.models.stack import HybridStack

    spec = builder.resolve("tiny", layer_pattern="DFMFAF", use_cpu_initialization=True,
                           **(dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
                              if recompute else {}))
    model = builder.build_model(spec, SEQ).train()
    tokens = torch.randint(0, spec.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(4))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(tokens[:, :-1], labels=tokens[:, 1:]).float().mean()
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    fused = loss_and_grads()

    def definition(stack, hidden_states, inputs):
        for layer in stack.layers:
            hidden_states = hidden_states + layer.mixer(layer.norm(hidden_states), inputs)
        return stack.final_norm(hidden_states)

    HybridStack.forward, original = definition, HybridStack.forward
    try:
        reference = loss_and_grads()
    finally:
        HybridStack.forward = original
    return fused, reference


@pytest.mark.parametrize("recompute", [False, True], ids=["plain", "recompute"])
def test_stack_equals_its_definition(recompute):
    (loss, grads), (ref_loss, ref_grads) = run_distributed(_stack_against_its_definition, world_size=1,
                                                           args=(recompute,))[0]
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():  # fp32 sums in another order: the meta tokens' gradient sums every
        # sequence's, and DeltaNet's and Mamba2's prefix once (the default) adds them in the layers
        torch.testing.assert_close(grads[name], ref, rtol=1e-5, atol=max(1e-7, 1e-6 * float(ref.abs().max())),
                                   msg=lambda m, n=name: f"gradient of {n}: {m}")


def _modules_owning_parameters_and_modules_called(tied):
    from megatron_flash.models import builder

    spec = builder.resolve("tiny", layer_pattern="DFMFAFSF", sliding_window=5, use_cpu_initialization=True,
                           tie_embeddings=tied)
    model = builder.build_model(spec, SEQ).train()
    owners = {name for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}
    called = set()
    for name, module in model.named_modules():
        module.register_forward_pre_hook(lambda m, args, name=name: called.add(name))
    tokens = torch.randint(0, spec.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(6))
    model(tokens[:, :-1], labels=tokens[:, 1:]).float().mean().backward()
    return owners, called


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_every_parameter_is_read_inside_its_modules_call(tied):
    """Each module that owns parameters is called (its forward pre-hooks run) in a training forward: what megatron's
    overlapped parameter all-gather relies on to wait for a bucket before its parameters are read. The residual
    norms, which the stack applies through layers.norm.add_and_norm, and an untied output layer included."""
    owners, called = run_distributed(_modules_owning_parameters_and_modules_called, world_size=1, args=(tied,))[0]
    assert any(name.endswith(".norm") for name in owners) and "decoder.final_norm" in owners
    assert ("output_layer" in owners) == (not tied)
    assert owners <= called, f"modules whose parameters are read without calling them: {sorted(owners - called)}"


# --- the meta tokens' rows computed once per micro-batch ------------------------------------------------------

def _batch_and_its_rows_alone(in_ffn, in_mixers):
    """Per-token losses and the parameter gradients of their sum for a batch of 3 rows, then the same summed over
    the rows run one at a time (nothing shared); and the shared prefix the FFN mixers were given in each. The FFN
    shares the meta rows with ``in_ffn``, DeltaNet and Mamba2 with ``in_mixers``."""
    from megatron_flash.layers.ffn import FFNMixer
    from megatron_flash.models import builder

    spec = builder.resolve("tiny", layer_pattern="DFMFAF", use_cpu_initialization=True, share_meta_rows=in_ffn,
                           share_meta_prefix_in_mixers=in_mixers)
    model = builder.build_model(spec, SEQ).train()
    tokens = torch.randint(0, spec.vocab_size, (3, SEQ + 1), generator=torch.Generator().manual_seed(8))
    prefixes = []
    for module in model.modules():
        if isinstance(module, FFNMixer):
            module.register_forward_pre_hook(lambda m, args: prefixes.append(args[1].shared_prefix))

    def losses_and_grads(rows):
        model.zero_grad(set_to_none=True)
        losses = torch.cat([model(tokens[r, :-1], labels=tokens[r, 1:]) for r in rows])
        losses.float().sum().backward()
        return losses.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    batched = losses_and_grads([slice(0, 3)])
    batched_prefixes, prefixes[:] = list(prefixes), []
    alone = losses_and_grads([slice(r, r + 1) for r in range(3)])
    return batched, alone, batched_prefixes, prefixes, spec.config.num_meta_tokens


@pytest.mark.parametrize("in_ffn,in_mixers", [(True, True), (True, False), (False, True), (False, False)],
                         ids=["ffn-and-mixers", "ffn", "mixers", "none"])
def test_meta_rows_computed_once_per_batch_equal_each_row_alone(in_ffn, in_mixers):
    (losses, grads), (ref_losses, ref_grads), shared, alone, meta = run_distributed(
        _batch_and_its_rows_alone, world_size=1, args=(in_ffn, in_mixers))[0]
    # the batch's layers were given its meta rows to share (unless no layer shares them); a row alone had nothing
    assert set(shared) == ({meta} if in_ffn or in_mixers else {0}) and set(alone) == {0}
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():  # fp32 sums in another order: absolute error scales with the largest entry
        torch.testing.assert_close(grads[name], ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()),
                                   msg=lambda m, n=name: f"gradient of {n}: {m}")


def _microbatches_with_the_meta_prefix_once(in_ffn, in_mixers, tp):
    """Per-token losses and accumulated parameter gradients of three micro-batches of 2 rows, run forward then
    backward one after another as megatron's schedule does: each computing its meta rows, then all three reading
    one MetaPrefix; and the errors that misuse of a MetaPrefix raises."""
    from megatron_flash.layers.shared_prefix import MetaPrefix
    from megatron_flash.models import builder

    spec = builder.resolve("tiny", layer_pattern="DFMFAF", use_cpu_initialization=True, share_meta_rows=in_ffn,
                           share_meta_prefix_in_mixers=in_mixers, tensor_model_parallel_size=tp)
    model = builder.build_model(spec, SEQ).train()
    tokens = torch.randint(0, spec.vocab_size, (3, 2, SEQ + 1), generator=torch.Generator().manual_seed(9))

    def run(once):
        model.zero_grad(set_to_none=True)
        meta_prefix = MetaPrefix(len(tokens)) if once else None
        if once:
            model(None, meta_prefix=meta_prefix)  # records it
        losses = []
        for batch in tokens:
            loss = model(batch[:, :-1], labels=batch[:, 1:], meta_prefix=meta_prefix)
            loss.float().sum().backward()
            losses.append(loss.detach())
        return torch.cat(losses), {n: p.grad.clone() for n, p in model.named_parameters()}, meta_prefix

    each, (once_losses, once_grads, meta_prefix) = run(False)[:2], run(True)
    errors, one = [], MetaPrefix(1)
    model(None, meta_prefix=one)
    for misuse in (lambda: model(tokens[0, :, :-1], labels=tokens[0, :, 1:], meta_prefix=meta_prefix),
                   lambda: model(tokens[0, :1, :-1], labels=tokens[0, :1, 1:], meta_prefix=one),
                   lambda: model(None, meta_prefix=meta_prefix)):
        with pytest.raises((RuntimeError, ValueError)) as info:
            misuse()
        errors.append(str(info.value))
    return (once_losses, once_grads), each, errors


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("in_ffn,in_mixers", [(True, True), (True, False), (False, True)],
                         ids=["ffn-and-mixers", "ffn", "mixers"])
def test_the_meta_prefix_once_per_step_gives_each_micro_batchs_results(in_ffn, in_mixers, tp):
    """The sharing layers' results on the meta rows recorded once (MetaPrefix) and read by three micro-batches:
    the same losses and accumulated gradients as each micro-batch computing them (the earlier micro-batches'
    gradients reach the parameters through the prefix in the last one's backward), at TP 1 and 2."""
    (losses, grads), (ref_losses, ref_grads), errors = run_distributed(
        _microbatches_with_the_meta_prefix_once, world_size=tp, tensor_model_parallel_size=tp,
        args=(in_ffn, in_mixers, tp))[0]
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()),
                                   msg=lambda m, n=name: f"gradient of {n}: {m}")
    assert ("fewer micro-batches" in errors[0] and "no layer shares" in errors[1]
            and "recorded once" in errors[2]), errors


# --- packed documents -------------------------------------------------------------------------------------------

def _packed_vs_separate():
    from megatron_flash.models import builder, packing

    spec = builder.resolve("tiny", layer_pattern="DFMFSFAF", sliding_window=5, use_cpu_initialization=True)
    model = builder.build_model(spec, 64)
    lengths = [11, 1, 23, 9]
    docs = [torch.randint(0, spec.vocab_size, (1, n + 1), generator=torch.Generator().manual_seed(n))
            for n in lengths]
    separate = torch.cat([model(d[:, :-1], labels=d[:, 1:]) for d in docs], dim=1)
    packed_in = torch.cat([d[:, :-1] for d in docs], dim=1)
    packed_labels = torch.cat([d[:, 1:] for d in docs], dim=1)
    cu = torch.tensor([0] + list(torch.cumsum(torch.tensor(lengths), 0)), dtype=torch.int32)
    packed = model(packed_in, labels=packed_labels, document_boundaries=cu)
    eod_cu = packing.document_boundaries_from_eod(torch.tensor([[5, 2, 7, 2], [1, 1, 2, 3]]), eod=2)
    return separate, packed, eod_cu


def test_packed_documents_equal_separate_runs():
    separate, packed, eod_cu = run_distributed(_packed_vs_separate, world_size=1)[0]
    torch.testing.assert_close(packed, separate, rtol=1e-5, atol=1e-5)
    assert eod_cu.tolist() == [0, 2, 4, 7, 8]


# --- loss ---------------------------------------------------------------------------------------------------------

def _loss_against_logits():
    import torch.nn.functional as F

    from megatron_flash.models import builder

    spec = builder.resolve("tiny", layer_pattern="DFAF", use_cpu_initialization=True, vocab_size=1000)
    model = builder.build_model(spec, SEQ)
    assert model.padded_vocab_size > model.vocab_size  # the padding must stay out of the softmax
    tokens = torch.randint(0, 1000, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(5))
    loss = model(tokens[:, :-1], labels=tokens[:, 1:])
    logits = model(tokens[:, :-1])
    want = F.cross_entropy(logits[..., :1000].float().flatten(0, 1), tokens[:, 1:].flatten(),
                           reduction="none").view(BATCH, SEQ)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    return True


def test_fused_loss_equals_cross_entropy_of_the_logits():
    assert run_distributed(_loss_against_logits, world_size=1) == [True]


def test_dense_grad_passes_values_and_makes_the_gradient_contiguous():
    """layers.base.dense_grad on a piece of a split that is used transposed: the same values forward; backward, the
    gradient reaching the split is the same numbers, contiguous (the split's cat then takes its vectorized kernel)."""
    from megatron_flash.layers.base import dense_grad

    projected = torch.randn(5, 3, 7, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(3, 5, 4, dtype=torch.float64)
    grads = {}
    for dense in (False, True):
        projected.grad = None
        wide, narrow = projected.split([3, 4], dim=-1)
        narrow.register_hook(lambda g, dense=dense: grads.__setitem__(dense, g))
        used = (dense_grad(narrow) if dense else narrow).transpose(0, 1)
        assert torch.equal(used, narrow.transpose(0, 1))
        ((used * weights).sum() + wide.sum()).backward()
    assert not grads[False].is_contiguous() and grads[True].is_contiguous()
    assert torch.equal(grads[True], grads[False])
