"""The pretraining loop over gloo: layouts agree, weight normalization holds, checkpoints resume and reshard."""

import os
import re

import pytest
import torch

from megatron_flash.testing import run_distributed

BASE = ["--mock-data", "--seq-length", "24", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--lr", "3e-3", "--lr-warmup-iters", "1", "--log-interval", "100", "--eval-interval", "1000",
        "--eval-iters", "0", "--save-interval", "1000", "--seed", "5"]


def _check_step(iteration, model, optimizer, record):
    """Weight-norm invariants of the full (TP-gathered, DP-assembled) fp32 main params, whether each
    low-precision model param equals its rounded main param, and whether Adam ran torch's fused kernel."""
    from megatron_flash.testing import weight_norm_invariants
    from megatron_flash.training.optimizer_params import leaf_optimizers

    fused = [group["fused"] for leaf in leaf_optimizers(optimizer) for group in leaf.optimizer.param_groups]
    record.append({**weight_norm_invariants(optimizer), "fused_adam": bool(fused) and all(fused)})


def _train(argv, check=False):
    from megatron_flash import pretrain
    from megatron_flash.training import arguments

    args = arguments.parse_args(argv, world_size=torch.distributed.get_world_size())
    record, configs = [], []

    def callback(iteration, model, optimizer):
        configs.append(model.config)
        if check:
            _check_step(iteration, model, optimizer, record)
    result = pretrain.train(args, step_callback=callback)
    config = configs[-1] if configs else None
    return {"losses": result["losses"], "checks": record, "iteration": result["iteration"],
            "recompute": (config.recompute_granularity, config.recompute_logits) if config else None,
            "mamba_chunk_size": config.mamba_chunk_size if config else None,
            "short_conv_backend": config.short_conv_backend if config else None,
            "share_meta_rows": config.share_meta_rows if config else None,
            "share_meta_prefix_in_mixers": config.share_meta_prefix_in_mixers if config else None,
            "meta_prefix_once_per_step": config.meta_prefix_once_per_step if config else None,
            "flops_per_token": result["flops_per_token"], "gradient_buckets": result["gradient_buckets"]}


def _run(extra, world=1, tp=1, pp=1, check=False, env=None):
    results = run_distributed(_train, world_size=world, tensor_model_parallel_size=tp,
                              pipeline_model_parallel_size=pp, args=(BASE + extra, check), env=env)
    return results


@pytest.fixture(scope="module")
def reference():
    return _run(["--train-iters", "4"], check=True)[0]


def test_loss_goes_down_on_mock_data():
    losses = _run(["--train-iters", "30", "--lr", "1e-2"])[0]["losses"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses


def _train_twice_then_another_seed(argv):
    """Three runs in one process, random numbers drawn between them: --seed 5, --seed 5 again, --seed 6."""
    first = _train(argv)["losses"]
    torch.rand(1000)
    again = _train(argv)["losses"]
    other = _train(argv + ["--seed", "6"])["losses"]
    return first, again, other


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="on the CPU initialization never reads the process's RNG (config.init_rng: streams of --seed)")
def test_the_seed_decides_a_run_whatever_ran_before_in_the_process():
    """pretrain.train seeds from --seed itself: a second run in one process (gpu_suite's rounds) repeats the first.
    On a GPU megatron initializes under its CUDA RNG tracker, which a run leaves advanced."""
    torch_paths = ["--ssd-backend", "torch", "--delta-rule-backend", "torch", "--short-conv-backend", "torch"]
    (first, again, other), = run_distributed(_train_twice_then_another_seed, world_size=1,
                                             args=(BASE + ["--train-iters", "2", *torch_paths],))
    torch.testing.assert_close(torch.tensor(again), torch.tensor(first), rtol=1e-6, atol=0)
    assert other != first


def _progress_output(log_interval):
    import contextlib
    import io

    from megatron_flash.training.loop_utils import ProgressLog

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        progress = ProgressLog(None, log_interval, tokens_per_iter=8, flops_per_iter=1.0, peak_flops=0.0)
        for iteration in (7, 8, 9, 10):  # a run resumed at iteration 6
            progress.step(iteration, 1.0, 1e-3, None, 0, {})
    return out.getvalue().splitlines()


def test_the_first_iteration_is_reported_before_the_first_log_line():
    lines = run_distributed(_progress_output, world_size=1, args=(10,))[0]
    assert len(lines) == 2, lines
    assert re.fullmatch(r"first iteration of this run \(7\) took \d+\.\d s, kernel compilation included", lines[0])
    assert lines[1].startswith("iteration      10 | loss 1.0000")
    # a line per iteration anyway: nothing more
    assert [line.split(" |")[0] for line in run_distributed(_progress_output, world_size=1, args=(1,))[0]] == [
        f"iteration {i:>7d}" for i in (7, 8, 9, 10)]


def test_weight_norm_holds_in_one_process(reference):
    assert all(c["worst_norm_error"] < 1e-5 for c in reference["checks"]), reference["checks"]


def test_adam_runs_torch_fused_kernel(reference):
    assert all(c["fused_adam"] for c in reference["checks"]), reference["checks"]


def _fused_adam_steps_against_the_formula() -> int:
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.optimizer import FP32Optimizer

    from megatron_flash.testing import OpTrace
    from megatron_flash.training.optimizer_params import use_fused_torch_adam

    lr, (b1, b2), eps = 1e-2, (0.9, 0.95), 1e-8
    gen = torch.Generator().manual_seed(0)
    param = torch.nn.Parameter(torch.randn(37, 5, generator=gen, dtype=torch.float64))
    optimizer = FP32Optimizer(torch.optim.Adam([param], lr=lr, betas=(b1, b2), eps=eps),
                              OptimizerConfig(lr=lr), init_state_fn=lambda *args: None)
    use_fused_torch_adam(optimizer)
    expected, m, v = param.detach().clone(), torch.zeros_like(param), torch.zeros_like(param)
    fused_steps = 0
    for step in range(1, 4):
        grad = torch.randn(param.shape, generator=gen, dtype=torch.float64)
        param.grad = grad.clone()
        with OpTrace() as trace:
            optimizer.optimizer.step()
        fused_steps += any(op[0].startswith("_fused_adam") for op in trace.ops)
        m, v = b1 * m + (1 - b1) * grad, b2 * v + (1 - b2) * grad**2
        expected -= lr * (m / (1 - b1**step)) / ((v / (1 - b2**step)).sqrt() + eps)
        torch.testing.assert_close(param.detach(), expected, rtol=1e-12, atol=1e-12)
    return fused_steps


def test_fused_adam_update_follows_the_adam_formula():
    """use_fused_torch_adam on megatron's torch-Adam fallback (FP32Optimizer, in the CPU runtime): three steps run
    torch's fused kernel and give Adam's update written out in plain PyTorch (bias-corrected moments, no weight
    decay)."""
    assert run_distributed(_fused_adam_steps_against_the_formula, world_size=1) == [3]


def _grad_norm_with_megatron_fallback_and_foreach():
    from megatron.core.optimizer import clip_grads

    from megatron_flash.testing import OpTrace
    from megatron_flash.training.optimizer_params import use_foreach_grad_norm

    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(shape, generator=gen) for shape in [(37, 5), (1,), (129,), (0, 3), (3, 7, 11)]]
    expected = torch.linalg.vector_norm(torch.cat([g.flatten().double() for g in grads])).item()
    found = {}
    for name in ("megatron", "foreach"):
        if name == "foreach":
            use_foreach_grad_norm()
        with OpTrace() as trace:
            found[name] = (clip_grads.get_grad_norm_fp32(grads), len(trace.host_reads()))
    return expected, found


def test_grad_norm_from_foreach_matches_megatrons_fallback():
    """use_foreach_grad_norm: megatron's clipping norm from torch's multi-tensor norm equals the one from its local
    fallback (no TE or Apex) and the fp64 definition, and reads one value on the host (megatron's final
    ``.item()``). The fallback's per-tensor reads happen inside ``torch.tensor``, out of a dispatch mode's sight:
    the GPU test below counts them as syncs."""
    expected, found = run_distributed(_grad_norm_with_megatron_fallback_and_foreach, world_size=1)[0]
    assert found["foreach"][1] == 1, found
    for value, _ in found.values():
        assert value == pytest.approx(expected, rel=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts CUDA synchronizations")
def test_foreach_grad_norm_does_not_synchronize_on_gpu():
    import warnings

    from megatron.core.utils import local_multi_tensor_l2_norm

    from megatron_flash.training.optimizer_params import _foreach_l2_norm

    grads = [torch.randn(shape, device="cuda") for shape in [(37, 5), (1,), (129,), (0, 3), (3, 7, 11)]]
    syncs, norms = {}, {}
    for name, impl in (("megatron", local_multi_tensor_l2_norm), ("foreach", _foreach_l2_norm)):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                norms[name] = impl(2048 * 32, None, [grads], False)[0]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        syncs[name] = sum("synchroniz" in str(w.message) for w in caught)
    assert syncs["megatron"] >= len(grads) and syncs["foreach"] == 0, syncs
    torch.testing.assert_close(norms["foreach"], norms["megatron"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU memory outside PyTorch's allocator")
def test_memory_outside_the_allocator_excludes_what_the_allocator_reserves():
    from megatron_flash.training.loop_utils import memory_outside_allocator_gib

    before = memory_outside_allocator_gib()
    block = torch.empty(2**30, dtype=torch.uint8, device="cuda")  # 1 GiB through the allocator
    after = memory_outside_allocator_gib()
    total = torch.cuda.mem_get_info()[1]
    assert 0 < before < total / 2**30 and abs(after - before) < 0.1, (before, after)
    del block


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA driver's stack limit")
def test_shrinking_kernel_local_memory_sets_the_stack_limit():
    from megatron_flash.training.loop_utils import memory_outside_allocator_gib, shrink_kernel_local_memory

    torch.ones(8, device="cuda").sum().item()  # a context with a kernel launched
    assert shrink_kernel_local_memory(4096) == 4096
    before = memory_outside_allocator_gib()
    assert shrink_kernel_local_memory() == 1024
    assert memory_outside_allocator_gib() <= before + 0.01


@pytest.mark.parametrize("world,tp,pp,extra", [
    (2, 2, 1, ["--tensor-model-parallel-size", "2"]),
    (2, 1, 2, ["--pipeline-model-parallel-size", "2"]),
    (2, 1, 1, ["--use-distributed-optimizer"]),
    (4, 2, 2, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--sequence-parallel"]),
    # buckets of ~2000 parameters: the tiny model's gradients are reduced in many buckets as backward fills them
    (2, 1, 1, ["--overlap-grad-reduce", "--ddp-bucket-size", "2000"]),
    (2, 1, 1, ["--use-distributed-optimizer", "--overlap-grad-reduce", "--ddp-bucket-size", "2000"]),
], ids=["tp2", "pp2", "dp2-distopt", "tp2xpp2-sp", "dp2-overlap", "dp2-distopt-overlap"])
def test_layouts_follow_the_same_loss_trajectory(reference, world, tp, pp, extra):
    results = _run(["--train-iters", "4"] + extra, world, tp, pp, check=True)
    assert reference["gradient_buckets"] == 1
    for r in results:
        assert (r["gradient_buckets"] > 5) == ("--ddp-bucket-size" in extra), r["gradient_buckets"]
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(reference["losses"]), rtol=1e-5, atol=0)
        assert all(c["worst_norm_error"] < 1e-5 for c in r["checks"]), r["checks"]


def _train_with_deferred_param_gathers(argv):
    """The run's losses, with every asynchronous parameter all-gather of megatron's buckets deferred until a forward
    pre-hook waits for that bucket (or a forced sync): a parameter read before its bucket's wait then holds the
    other ranks' pre-step values, as on a GPU where the gather has not landed yet (gloo's finish at once, which
    would hide the read). No step callback: pretrain gathers every parameter before calling one."""
    from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBucketGroup as BucketGroup

    start, finish = BucketGroup.start_param_sync, BucketGroup.finish_param_sync
    waits = []

    def deferred_start(self, force_sync=False):
        self.deferred = self.ddp_config.overlap_param_gather and not force_sync  # else megatron's gather is synchronous
        if not self.deferred:
            return start(self, force_sync=force_sync)
        self.param_gather_dispatched = True  # dispatched as far as megatron knows; nothing moved yet

    def gathering_finish(self, skip_next_bucket_dispatch=False):
        if getattr(self, "deferred", False) or not self.param_gather_dispatched:
            waits.append(1)
            deferred_start(self, force_sync=True)
        return finish(self, skip_next_bucket_dispatch)

    BucketGroup.start_param_sync, BucketGroup.finish_param_sync = deferred_start, gathering_finish
    try:
        from megatron_flash import pretrain
        from megatron_flash.training import arguments

        result = pretrain.train(arguments.parse_args(argv, world_size=torch.distributed.get_world_size()))
        return result["losses"], len(waits)
    finally:
        BucketGroup.start_param_sync, BucketGroup.finish_param_sync = start, finish


@pytest.mark.parametrize("tied,pp", [(True, 1), (False, 1), (True, 2)], ids=["tied", "untied", "tied-pp2"])
def test_overlapped_parameter_gather_trains_as_one_process(tied, pp):
    """--overlap-param-gather at DP 2 (distributed optimizer, buckets of ~2000 parameters; one bucket on the second
    pipeline stage, as megatron does): each bucket's updated parameters are gathered when the first module that
    reads them is called; the losses are those of one process. Fails if a parameter is read outside its module's
    call (e.g. the untied output weight, or the last stage's copy of the tied one, read by the loss)."""
    extra = ["--train-iters", "4"] + ([] if tied else ["--untie-embeddings"])
    reference_losses = _run(extra)[0]["losses"]
    overlapped = extra + ["--use-distributed-optimizer", "--overlap-grad-reduce", "--ddp-bucket-size", "2000",
                          "--overlap-param-gather", "--pipeline-model-parallel-size", str(pp)]
    results = run_distributed(_train_with_deferred_param_gathers, world_size=2 * pp, pipeline_model_parallel_size=pp,
                              args=(BASE + overlapped,))
    for losses, waits in results:
        assert waits >= 4 * (1 if pp > 1 else 5)  # each bucket waited for in every iteration's forward
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_losses), rtol=1e-5, atol=0)


def test_bf16_distributed_optimizer_keeps_model_params_equal_to_rounded_main_params():
    results = _run(["--train-iters", "3", "--bf16", "--use-distributed-optimizer"], world=2, check=True)
    for r in results:
        assert all(c["bf16_mismatches"] == 0 and c["fused_adam"] for c in r["checks"]), r["checks"]
        assert all(c["worst_norm_error"] < 1e-5 for c in r["checks"]), r["checks"]


def _train_normalizing_off_the_default_device(argv):
    """_train with the weight normalization run under the "meta" default device: a tensor it creates without an
    explicit device lands on "meta" and fails against the real ones, as a CPU tensor does against CUDA ones on a
    GPU (gloo on the CPU cannot show that otherwise). Also counts the matrices this rank holds no shard of."""
    from megatron_flash.training.weight_norm import WeightNormalizer

    original, unsharded = WeightNormalizer.normalize, []

    def on_meta_default_device(self, entries, group):
        unsharded.append(sum(e.main_param is None for e in entries))
        with torch.device("meta"):
            return original(self, entries, group)

    WeightNormalizer.normalize = on_meta_default_device
    try:
        return {**_train(argv, check=True), "unsharded": max(unsharded)}
    finally:
        WeightNormalizer.normalize = original


def test_distributed_optimizer_weight_norm_creates_nothing_on_the_default_device():
    results = run_distributed(_train_normalizing_off_the_default_device, world_size=2,
                              args=(BASE + ["--train-iters", "2", "--bf16", "--use-distributed-optimizer"],))
    assert max(r["unsharded"] for r in results) > 0  # the path of a matrix with no local shard ran
    for r in results:
        assert all(c["worst_norm_error"] < 1e-5 for c in r["checks"]), r["checks"]


def test_stop_and_resume_matches_an_uninterrupted_run(tmp_path):
    full = _run(["--train-iters", "6"])[0]["losses"]
    ckpt = str(tmp_path / "ckpt")
    first = _run(["--train-iters", "6", "--save", ckpt, "--exit-interval", "3"])[0]
    assert first["iteration"] == 3
    second = _run(["--train-iters", "6", "--save", ckpt, "--load", ckpt])[0]
    assert second["iteration"] == 6
    torch.testing.assert_close(torch.tensor(first["losses"] + second["losses"]), torch.tensor(full),
                               rtol=1e-6, atol=0)


def test_distributed_optimizer_checkpoint_resumes_and_reshards(tmp_path):
    """Saved at TP=2 x DP=2 with the distributed optimizer, resumed in one process: same losses as never stopping."""
    full = _run(["--train-iters", "5"])[0]["losses"]
    ckpt = str(tmp_path / "ckpt")
    _run(["--train-iters", "5", "--save", ckpt, "--exit-interval", "2", "--tensor-model-parallel-size", "2",
          "--use-distributed-optimizer"], world=4, tp=2)
    resumed = _run(["--train-iters", "5", "--load", ckpt])[0]
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(full[2:]), rtol=1e-5, atol=0)


def _checkpoint_weights(root):
    """The model weights a checkpoint holds (what the exporter reads), full tensors by global name."""
    from megatron_flash.export import convert

    info = convert.read_checkpoint(root)
    return convert.load_megatron_tensors(info, convert.trained_vocab_size(info))[1]


def test_checkpoint_saved_with_overlapped_parameter_gather_resumes(tmp_path):
    """Saved at DP=2 with --overlap-param-gather right after a step, each rank's other shards not yet gathered by
    a forward (deferred as in test_overlapped_parameter_gather_trains_as_one_process): the save gathers them first,
    so the checkpoint's model weights are those saved without the option, and one process resumes with the losses
    of never stopping."""
    full = _run(["--train-iters", "5"])[0]["losses"]
    saves = {}
    for name, extra in (("plain", []), ("overlapped", ["--overlap-grad-reduce", "--ddp-bucket-size", "2000",
                                                       "--overlap-param-gather"])):
        saves[name] = str(tmp_path / name)
        run_distributed(_train_with_deferred_param_gathers, world_size=2, args=(BASE + [
            "--train-iters", "5", "--save", saves[name], "--exit-interval", "2", "--use-distributed-optimizer",
            *extra],))
    plain, overlapped = (run_distributed(_checkpoint_weights, world_size=1, args=(saves[n],))[0]
                         for n in ("plain", "overlapped"))
    assert plain.keys() == overlapped.keys()
    for name, weight in plain.items():
        torch.testing.assert_close(overlapped[name], weight, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    resumed = _run(["--train-iters", "5", "--load", saves["overlapped"]])[0]
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(full[2:]), rtol=1e-5, atol=0)


def test_checkpoint_saved_at_tp2_resumes_under_pp2(tmp_path):
    """Layers are saved under their global index and loaded under the second stage's local names."""
    full = _run(["--train-iters", "4"])[0]["losses"]
    ckpt = str(tmp_path / "ckpt")
    _run(["--train-iters", "4", "--save", ckpt, "--exit-interval", "2", "--tensor-model-parallel-size", "2"],
         world=2, tp=2)
    resumed = _run(["--train-iters", "4", "--load", ckpt, "--pipeline-model-parallel-size", "2"], world=2, pp=2)
    for r in resumed:
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(full[2:]), rtol=1e-5, atol=0)


def test_a_save_killed_midway_leaves_the_previous_checkpoint(tmp_path):
    from megatron_flash.training import checkpointing

    ckpt = str(tmp_path / "ckpt")
    with pytest.raises(RuntimeError):
        _run(["--train-iters", "6", "--save", ckpt, "--save-interval", "2"],
             env={checkpointing.CRASH_BEFORE_COMMIT_ENV: "4"})
    assert checkpointing.latest_iteration(ckpt) == 2
    assert os.path.isdir(os.path.join(ckpt, "iter_0000004.tmp"))
    resumed = _run(["--train-iters", "6", "--save", ckpt, "--load", ckpt, "--save-interval", "2"])[0]
    assert len(resumed["losses"]) == 4 and resumed["iteration"] == 6
    assert checkpointing.latest_iteration(ckpt) == 6
    assert not os.path.exists(os.path.join(ckpt, "iter_0000004.tmp"))


def test_loss_goes_down_on_real_text(tmp_path):
    import json

    from tests import test_data_fixtures as fx

    prefixes = fx.tokenized_sample("hf")
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"train": ["0.5", prefixes["train0"], "0.5", prefixes["train1"]],
                                  "valid": [prefixes["valid"]]}))
    argv = ["--per-split-data-args-path", str(splits), "--tokenizer-type", "HuggingFaceTokenizer",
            "--tokenizer-model", fx.hf_tokenizer_dir(), "--seq-length", "64", "--micro-batch-size", "4",
            "--train-iters", "40", "--lr", "5e-3", "--lr-warmup-iters", "2", "--eval-interval", "40",
            "--eval-iters", "2", "--log-interval", "100", "--tensorboard-dir", str(tmp_path / "tb")]
    result = run_distributed(_train, world_size=1, args=(argv, False))[0]
    losses = result["losses"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses
    events = [f for f in os.listdir(tmp_path / "tb") if f.startswith("events.out.tfevents")]
    assert events, "no TensorBoard event file written"


# --- flags ------------------------------------------------------------------------------------------------------

def _parse(argv, world=1):
    from megatron_flash.training import arguments

    return arguments.parse_args(argv, world_size=world)


@pytest.mark.parametrize("argv,message", [
    (["--mock-data"], "exactly one of --train-iters and --train-tokens"),
    (["--mock-data", "--train-iters", "5", "--train-tokens", "100"], "exactly one of --train-iters"),
    (["--train-iters", "5"], "exactly one of --data-path"),
    (["--mock-data", "--train-iters", "5", "--sequence-parallel"], "needs --tensor-model-parallel-size"),
    (["--mock-data", "--train-iters", "5", "--global-batch-size", "3", "--micro-batch-size", "2"],
     "not divisible"),
    (["--mock-data", "--train-iters", "5", "--pattern", "DFQ"], "position 2"),
    (["--mock-data", "--train-iters", "5", "--no-such-flag"], "invalid command line"),
    (["--mock-data", "--train-iters", "5", "--min-lr", "1", "--lr", "0.1"], "above --lr"),
    (["--mock-data", "--train-iters", "5", "--lr-warmup-iters", "5"], "must be below the 5 decay"),
    (["--mock-data", "--train-iters", "5", "--profile", "--profile-step-start", "3", "--profile-step-end", "9",
      "--profile-dir", "p"], "0 <= start < end <= --train-iters 5"),
    (["--mock-data", "--train-iters", "5", "--profile", "--profile-step-start", "1", "--profile-step-end", "2"],
     "--profile needs --profile-dir or --tensorboard-dir"),
    (["--mock-data", "--train-iters", "5", "--ddp-bucket-size", "1000"], "needs --overlap-grad-reduce"),
    (["--mock-data", "--train-iters", "5", "--overlap-param-gather", "--use-distributed-optimizer"],
     "--overlap-param-gather needs --use-distributed-optimizer and --overlap-grad-reduce"),
    (["--mock-data", "--train-iters", "5", "--overlap-grad-reduce", "--ddp-bucket-size", "0"], "positive size"),
])
def test_bad_flags_are_clear_errors(argv, message):
    from megatron_flash.training import arguments

    with pytest.raises(arguments.ArgumentError, match=message):
        _parse(argv)


def test_preset_file_loads_fields_and_its_errors_name_the_file_and_field(tmp_path):
    import json
    import re

    from megatron_flash import presets
    from megatron_flash.training import arguments

    fields = presets.get_preset("tiny")
    flags = ["--mock-data", "--train-iters", "1"]
    good = tmp_path / "shape.json"
    good.write_text(json.dumps({**fields, "hidden_size": 96}))
    args = _parse(flags + ["--preset-file", str(good)])
    assert arguments.model_preset(args) == {**fields, "hidden_size": 96}
    assert arguments.model_name(args) == str(good)
    assert arguments.model_preset(_parse(flags + ["--preset", "nemotron_flash_1b"])) == "nemotron_flash_1b"
    assert arguments.model_preset(_parse(flags)) == "tiny"
    # a checkpoint's recorded args (a dict), and an older one's that recorded no preset_fields
    assert arguments.model_preset(vars(args)) == {**fields, "hidden_size": 96}
    assert arguments.model_preset({"preset": "tiny"}) == "tiny"

    cases = {
        "absent.json": (None, "cannot read it"),
        "truncated.json": ('{"hidden_size": 64,', "not JSON (line 1, column 20"),
        "list.json": ("[1, 2]", "expected a JSON object of model fields"),
        "lacks.json": ({k: v for k, v in fields.items() if k != "num_query_groups"},
                       "missing field(s) num_query_groups"),
        "typo.json": ({**fields, "hiden_size": 64}, "unknown field(s) hiden_size"),
        "type.json": ({**fields, "num_attention_heads": "4"},
                      "field num_attention_heads must be a non-negative integer, got '4'"),
        "flag.json": ({**fields, "tie_embeddings": 1}, "field tie_embeddings must be a bool, got 1"),
        "pattern.json": ({**fields, "layer_pattern": "DFQ"}, "field layer_pattern: invalid layer 'Q' at position 2"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_text(content if isinstance(content, str) else json.dumps(content))
        with pytest.raises(arguments.ArgumentError, match=re.escape(f"--preset-file {path}: {message}")):
            _parse(flags + ["--preset-file", str(path)])
    with pytest.raises(arguments.ArgumentError, match="invalid command line"):  # one model shape at a time
        _parse(flags + ["--preset", "tiny", "--preset-file", str(good)])
    config = tmp_path / "run.yaml"
    config.write_text("preset: nemotron_flash_1b\n")
    with pytest.raises(arguments.ArgumentError, match="give --preset or --preset-file, not both"):
        _parse(flags + ["--config", str(config), "--preset-file", str(good)])


def test_yaml_config_with_command_line_override(tmp_path):
    from megatron_flash.training import arguments

    cfg = tmp_path / "run.yaml"
    cfg.write_text("mock-data: true\ntrain_iters: 7\nlr: 0.01\nmicro-batch-size: 2\n")
    args = _parse(["--config", str(cfg), "--lr", "0.002"], world=2)
    assert (args.mock_data, args.train_iters, args.lr, args.micro_batch_size) == (True, 7, 0.002, 2)
    assert args.global_batch_size == 4 and args.num_microbatches == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("mock-data: true\nlearning_rate: 0.1\n")
    with pytest.raises(arguments.ArgumentError, match=r"bad.yaml: unknown key 'learning_rate'"):
        _parse(["--config", str(bad), "--train-iters", "3"])


def test_train_tokens_sets_the_iteration_count():
    args = _parse(["--mock-data", "--train-tokens", "1000", "--seq-length", "100", "--micro-batch-size", "2"])
    assert args.train_iters == 5


def test_training_with_document_masking_runs_and_learns():
    losses = _run(["--train-iters", "12", "--lr", "1e-2", "--reset-attention-mask"])[0]["losses"]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses


@pytest.mark.parametrize("flag,rtol,recompute", [
    ("--recompute-activations", 1e-6, ("full", False)),
    # the output layer's gradients are then summed in another order (chunks of vocabulary rows)
    ("--recompute-logits", 1e-5, (None, True)),
])
def test_recomputation_gives_the_same_losses(reference, flag, rtol, recompute):
    """The flag reaches the model's config, the MFU counts the recomputed forward, and the losses are unchanged."""
    run = _run(["--train-iters", "4", flag])[0]
    assert reference["recompute"] == (None, False) and run["recompute"] == recompute
    assert run["flops_per_token"] > reference["flops_per_token"]
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(reference["losses"]), rtol=rtol, atol=0)


def test_mamba_chunk_size_changes_no_loss(reference):
    """--mamba-chunk-size reaches the config (the tiny preset's is 16) and leaves the losses as they were: the chunked
    scan is exact at any chunk length (32 positions here: 2 chunks of 16 against 4 of 8)."""
    run = _run(["--train-iters", "4", "--mamba-chunk-size", "8"])[0]
    assert reference["mamba_chunk_size"] == 16 and run["mamba_chunk_size"] == 8
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(reference["losses"]), rtol=1e-5, atol=0)


def test_short_conv_backend_reaches_the_layers(reference):
    """--short-conv-backend reaches the config the layers read; on the CPU auto is torch: the same losses."""
    run = _run(["--train-iters", "4", "--short-conv-backend", "torch"])[0]
    assert reference["short_conv_backend"] == "auto" and run["short_conv_backend"] == "torch"
    assert run["losses"] == reference["losses"]


def test_sharing_the_meta_rows_changes_no_loss(reference):
    """By default the FFN computes the meta rows once per micro-batch of 2 (layers/shared_prefix.py);
    --no-share-meta-rows reaches the config and computes them per sequence: the same losses."""
    run = _run(["--train-iters", "4", "--no-share-meta-rows"])[0]
    assert reference["share_meta_rows"] is True and run["share_meta_rows"] is False
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(reference["losses"]), rtol=1e-5, atol=0)


@pytest.mark.parametrize("world,tp,pp,extra", [
    (1, 1, 1, []),
    (4, 2, 2, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
], ids=["one-process", "tp2xpp2"])
def test_the_meta_prefix_once_in_the_mixers_changes_no_loss(reference, world, tp, pp, extra):
    """By default DeltaNet and Mamba2 run the meta tokens once per micro-batch of 2 and the text from their states
    (layers/shared_prefix.py); --no-share-meta-prefix reaches the config and runs them per sequence, on one process
    and across TP and PP stages: the same losses, more FLOPs counted."""
    run = _run(["--train-iters", "4", "--no-share-meta-prefix", *extra], world=world, tp=tp, pp=pp)[-1]
    assert reference["share_meta_prefix_in_mixers"] is True and run["share_meta_prefix_in_mixers"] is False
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(reference["losses"]), rtol=1e-5, atol=0)
    assert run["flops_per_token"] > reference["flops_per_token"]


@pytest.mark.parametrize("world,tp,extra", [
    (1, 1, []),
    (2, 2, ["--tensor-model-parallel-size", "2"]),
    # DDP reduces each bucket as the last micro-batch's backward fills it: the prefix's gradients must be in by
    # then; 2 micro-batches per rank at global batch 8, compared with the run without the flag
    (2, 1, ["--use-distributed-optimizer", "--overlap-grad-reduce", "--ddp-bucket-size", "2000",
            "--global-batch-size", "8"]),
], ids=["one-process", "tp2", "dp2-distopt-overlap"])
def test_the_meta_prefix_once_per_step_changes_no_loss(reference, world, tp, extra):
    """By default the sharing layers read the meta rows' results from one pass per optimizer step of 2
    micro-batches (layers/shared_prefix.py: MetaPrefix); --no-meta-prefix-once-per-step reaches the config and
    computes them in every micro-batch: the same losses, more FLOPs counted."""
    run = _run(["--train-iters", "4", "--no-meta-prefix-once-per-step", *extra], world=world, tp=tp)[-1]
    if "--global-batch-size" in extra:
        reference = _run(["--train-iters", "4", *extra], world=world, tp=tp)[-1]
    assert reference["meta_prefix_once_per_step"] is True and run["meta_prefix_once_per_step"] is False
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(reference["losses"]), rtol=1e-5, atol=0)
    assert run["flops_per_token"] > reference["flops_per_token"]


def _model_log_line(argv):
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        _train(argv)
    return next(line for line in out.getvalue().splitlines() if line.startswith("model:"))


@pytest.mark.parametrize("extra, schedule", [
    ([], "once per step"),
    (["--no-meta-prefix-once-per-step"], "once per micro-batch"),
    (["--micro-batch-size", "1"], "per sequence"),
    (["--num-meta-tokens", "0"], "none"),
])
def test_the_start_up_log_says_how_often_the_meta_prefix_is_computed(extra, schedule):
    line, = run_distributed(_model_log_line, world_size=1, args=(BASE + ["--train-iters", "2", *extra],))
    assert line.endswith(f"| meta prefix {schedule}"), line


def _train_counting_fused_wgrads(argv):
    """The run, and how many weight gradients megatron's linears accumulated through ops/wgrad.py."""
    from megatron_flash.ops import wgrad

    calls, original = [], wgrad.wgrad_gemm_accum_fp32

    def counted(*args):
        calls.append(1)
        original(*args)

    wgrad.wgrad_gemm_accum_fp32 = counted
    try:
        return _train(argv), len(calls)
    finally:
        wgrad.wgrad_gemm_accum_fp32 = original


def test_gradient_accumulation_fusion_changes_no_loss():
    """By default megatron's linears accumulate their weight gradients into the fp32 main gradients themselves
    (ops/wgrad.py), over 2 micro-batches per step here; --no-gradient-accumulation-fusion leaves that to DDP's
    hooks. The same losses either way."""
    argv = BASE + ["--train-iters", "3"]
    (fused, fused_calls), = run_distributed(_train_counting_fused_wgrads, world_size=1, args=(argv,))
    (unfused, unfused_calls), = run_distributed(_train_counting_fused_wgrads, world_size=1,
                                                args=(argv + ["--no-gradient-accumulation-fusion"],))
    assert fused_calls > 0 and unfused_calls == 0
    torch.testing.assert_close(torch.tensor(fused["losses"]), torch.tensor(unfused["losses"]), rtol=1e-6, atol=0)


def _train_profiled(argv):
    from megatron_flash import pretrain
    from megatron_flash.training import arguments

    return pretrain.train(arguments.parse_args(argv, world_size=1))["profile"]


def test_profile_writes_a_trace_and_time_by_layer_type_and_kernel(tmp_path):
    profile = run_distributed(_train_profiled, world_size=1, args=(BASE + [
        "--train-iters", "4", "--profile", "--profile-step-start", "2", "--profile-step-end", "4",
        "--profile-dir", str(tmp_path)],))[0]
    assert (tmp_path / "trace_rank0.json").stat().st_size > 0
    text = (tmp_path / "kernels_rank0.txt").read_text()
    assert "forward by layer type" in text and "backward by autograd function" in text
    # the tiny preset has every layer type; each ran once per layer per micro-batch (2 per iteration)
    layers = {row["layer"]: row for row in profile["layers_forward"]}
    assert set(layers) == {"DeltaNetMixer", "Mamba2Mixer", "AttentionMixer", "FFNMixer"}, layers
    assert all(row["ms_per_iter"] > 0 for row in layers.values())
    assert profile["kernels"] and any("mm" in row["name"] for row in profile["kernels"]), profile["kernels"]
    # backward by autograd function: the linear layers' backward ran, and every row has time
    functions = {row["function"]: row for row in profile["backward"]}
    assert any(name.startswith("LinearWithGradAccumulation") for name in functions), sorted(functions)
    assert all(row["ms_per_iter"] > 0 for row in functions.values())


def _host_reads_per_iteration(argv):
    from megatron_flash import pretrain
    from megatron_flash.testing import OpTrace
    from megatron_flash.training import arguments

    args = arguments.parse_args(argv, world_size=torch.distributed.get_world_size())
    seen = []
    with OpTrace() as trace:
        pretrain.train(args, step_callback=lambda *_: seen.append(trace.host_reads()))
    return [after[len(before):] for before, after in zip(seen, seen[1:])]


def _tensorboard_scalars(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return events.Scalars(tag)


def test_weight_norm_deviation_is_the_same_with_the_distributed_optimizer(tmp_path):
    """The logged deviation is the mean over every normalized row/column, whether the main params are whole (one
    process) or flat shards over DP ranks (distributed optimizer, DP 2): the same training, the same curve."""
    _run(["--train-iters", "3", "--tensorboard-dir", str(tmp_path / "one")])
    _run(["--train-iters", "3", "--use-distributed-optimizer", "--tensorboard-dir", str(tmp_path / "dp2")], world=2)
    one, dp2 = ([e.value for e in _tensorboard_scalars(tmp_path / run, "train/weight-norm-deviation")]
                for run in ("one", "dp2"))
    # the first step's learning rate is 0 (one warmup iteration): its deviation is rounding, ~1e-8
    assert len(one) == 3 and min(one[1:]) > 1e-4, one
    assert dp2 == pytest.approx(one, rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("extra", [[], ["--use-distributed-optimizer", "--bf16"]], ids=["fp32", "bf16-distopt"])
def test_an_iteration_reads_one_value_on_the_host_besides_the_loss(extra):
    """Each host read makes the host wait for the GPU, which then idles while the host builds the next batch. Per
    iteration the loop reads the loss with the exit flag (``tolist``, which dispatches no op on the CPU), and
    megatron's optimizer reads the gradient norm; the weight normalizer's deviation waits for the progress log."""
    reads = run_distributed(_host_reads_per_iteration, world_size=1,
                            args=(BASE + ["--train-iters", "4"] + extra,))[0]
    assert reads == [["_local_scalar_dense.default"]] * 3, reads


def test_device_scalars_reach_tensorboard_for_every_iteration(tmp_path):
    """The weight norm's deviation is read at each console line (every 2 here) and at the end: every iteration's
    value is in the event file."""
    _run(["--train-iters", "5", "--log-interval", "2", "--tensorboard-dir", str(tmp_path / "tb")])
    deviation = _tensorboard_scalars(tmp_path / "tb", "train/weight-norm-deviation")
    assert [e.step for e in deviation] == [1, 2, 3, 4, 5]
    assert all(0 < e.value < 0.5 for e in deviation), deviation
    assert [e.step for e in _tensorboard_scalars(tmp_path / "tb", "train/lm-loss")] == [1, 2, 3, 4, 5]
