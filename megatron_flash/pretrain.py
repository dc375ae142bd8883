"""Pretrain a Nemotron-Flash model: ``torchrun --nproc-per-node N -m megatron_flash.pretrain [flags]``.

One process per GPU (NCCL) or, without GPUs, per CPU rank (gloo). Flags follow Megatron-LM; see docs/cli.md.
The loop is :func:`train`: build, resume, then step / log / evaluate / save until done or signalled.
"""

from __future__ import annotations

import math
import os
import sys
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_flash import flops, runtime
from megatron_flash.layers import shared_prefix
from megatron_flash.models import builder, specs
from megatron_flash.models.packing import document_boundaries_from_eod
from megatron_flash.ops import wgrad
from megatron_flash.training import arguments, checkpointing
from megatron_flash.training.loop_utils import (ExitSignal, ProgressLog, StepProfiler, gather_parameters,
                                                global_batch_loss, is_logging_rank, microbatches,
                                                peak_flops_per_second)
from megatron_flash.training.optimizer_params import use_foreach_grad_norm, use_fused_torch_adam
from megatron_flash.training.weight_norm import WeightNormalizer, normalize_model_params


def log(msg: str) -> None:
    if is_logging_rank():
        print(msg, flush=True)


def build_model_and_optimizer(args, vocab_size: int):
    spec = builder.resolve(
        arguments.model_preset(args), args.pattern,
        **{k: v for k, v in dict(
            num_meta_tokens=args.num_meta_tokens, sliding_window=args.sliding_window,
            mamba_chunk_size=args.mamba_chunk_size).items() if v is not None},
        vocab_size=vocab_size, tie_embeddings=not args.untie_embeddings,
        sequence_parallel=args.sequence_parallel, ssd_backend=args.ssd_backend,
        delta_rule_backend=args.delta_rule_backend, short_conv_backend=args.short_conv_backend, bf16=args.bf16,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        use_cpu_initialization=args.use_cpu_initialization or not torch.cuda.is_available(),
        init_seed=args.seed,
        recompute_granularity="full" if args.recompute_activations else None,
        recompute_method="uniform" if args.recompute_activations else None,
        recompute_num_layers=1 if args.recompute_activations else None,
        recompute_logits=args.recompute_logits, gradient_accumulation_fusion=args.gradient_accumulation_fusion,
        share_meta_rows=args.share_meta_rows, share_meta_prefix_in_mixers=args.share_meta_prefix_in_mixers,
        meta_prefix_once_per_step=args.meta_prefix_once_per_step,
    )
    use_te = args.transformer_impl == "transformer_engine"
    if use_te and not specs.te_available():
        raise RuntimeError("--transformer-impl transformer_engine: Transformer Engine is not installed")
    if args.gradient_accumulation_fusion:
        wgrad.install()
    model = builder.build_model(spec, args.seq_length, use_te=use_te)
    if args.weight_norm:
        normalize_model_params([model], args.weight_norm_embeddings)
    ddp = DistributedDataParallel(spec.config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=args.overlap_grad_reduce, bucket_size=args.ddp_bucket_size,
        overlap_param_gather=args.overlap_param_gather,
        use_distributed_optimizer=args.use_distributed_optimizer), model)
    spec.config.finalize_model_grads_func = finalize_model_grads
    if args.overlap_grad_reduce:
        spec.config.no_sync_func = ddp.no_sync
        spec.config.grad_sync_func = ddp.start_grad_sync
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        clip_grad=args.clip_grad, bf16=args.bf16, params_dtype=spec.config.params_dtype,
        use_distributed_optimizer=args.use_distributed_optimizer), [ddp])
    use_fused_torch_adam(optimizer)
    use_foreach_grad_norm()
    normalizer = WeightNormalizer(optimizer, args.weight_norm_embeddings) if args.weight_norm else None
    decay_iters = args.lr_decay_iters or args.train_iters
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if args.lr_warmup_iters else args.lr, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters * args.global_batch_size,
        lr_decay_steps=decay_iters * args.global_batch_size, lr_decay_style=args.lr_decay_style.upper()
        if args.lr_decay_style == "wsd" else args.lr_decay_style,
        start_wd=args.weight_decay, end_wd=args.weight_decay, wd_incr_steps=decay_iters * args.global_batch_size,
        wd_incr_style="constant", override_opt_param_scheduler=args.override_opt_param_scheduler,
        use_checkpoint_opt_param_scheduler=not args.override_opt_param_scheduler,
        wsd_decay_steps=(args.lr_wsd_decay_iters or max(1, decay_iters // 10)) * args.global_batch_size
        if args.lr_decay_style == "wsd" else None,
        lr_wsd_decay_style="cosine" if args.lr_decay_style == "wsd" else None)
    return spec, model, ddp, optimizer, scheduler, normalizer


def build_data(args, seed: int):
    from megatron_flash.data.datasets import build_pretraining_datasets
    from megatron_flash.data.tokenizer import build_tokenizer

    if args.mock_data:
        vocab = args.vocab_size or builder.resolve(arguments.model_preset(args)).vocab_size
        tokenizer = build_tokenizer("NullTokenizer", vocab_size=vocab)
    else:
        tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
    eval_samples = (args.train_iters // args.eval_interval + 1) * args.eval_iters * args.global_batch_size
    train, valid, _ = build_pretraining_datasets(
        None if args.mock_data else args.data_path, args.split, args.seq_length, tokenizer, seed,
        [args.train_iters * args.global_batch_size, eval_samples, 0], mock=args.mock_data,
        path_to_cache=args.data_cache_path, per_split_data_args=args.per_split_data_args_path,
        # every rank reads its own micro-batches (the indexed files are memory-mapped; no broadcast needed)
        build_on_every_rank=True, create_attention_mask=False)
    return tokenizer, train, valid


def forward_step(eod, meta_prefix, data_iterator, ddp_model):
    """megatron schedule callback: one micro-batch -> (per-token losses, loss reduction).

    With ``eod`` (--reset-attention-mask) the micro-batch is one packed row whose documents end at EOD tokens.
    ``meta_prefix``: the step's meta prefix, computed once (layers/shared_prefix.py: MetaPrefix), or None.
    """
    batch = next(data_iterator)
    if eod is None:
        losses = ddp_model(batch["tokens"], labels=batch["labels"], meta_prefix=meta_prefix)
    else:
        batch = {k: v.reshape(1, -1) for k, v in batch.items()}
        losses = ddp_model(batch["tokens"], labels=batch["labels"],
                           document_boundaries=document_boundaries_from_eod(batch["tokens"], eod))

    def loss_func(output):
        mask = batch["loss_mask"].float()
        loss = (output.float() * mask).sum() / mask.sum().clamp_min(1)
        return loss, {"lm loss": loss.detach().clone()}  # the schedule scales `loss` in place

    return losses, loss_func


def meta_prefix_once_per_step(config, args) -> bool:
    """Whether each optimizer step computes the meta prefix once for all its micro-batches."""
    return shared_prefix.meta_prefix_once_per_step(config, args.micro_batch_size, args.reset_attention_mask,
                                                   args.pipeline_model_parallel_size)


def meta_prefix_schedule(config, args) -> str:
    """How often a training step computes the meta tokens' prefix in the layers that share it, for the log."""
    if meta_prefix_once_per_step(config, args):
        return "once per step"
    if shared_prefix.shares_meta_rows(config, args.micro_batch_size, args.reset_attention_mask, training=True):
        return "once per micro-batch"
    return "per sequence" if config.num_meta_tokens else "none"


def run_batches(args, ddp, dataset, first_sample: int, forward_only: bool,
                exit_requested: bool = False) -> tuple[float, bool]:
    """Forward (and backward) over one global batch; returns the batch's mean loss and whether any rank asked to
    exit (``exit_requested`` is this rank's say), both the same on every rank."""
    eod = dataset.config.tokenizer.eod if args.reset_attention_mask else None
    meta_prefix = None
    if not forward_only and meta_prefix_once_per_step(ddp.module.config, args):
        meta_prefix = shared_prefix.MetaPrefix(args.num_microbatches)
        ddp(None, meta_prefix=meta_prefix)  # records it: the meta tokens through the stack, once for the step
    results = get_forward_backward_func()(
        forward_step_func=partial(forward_step, eod, meta_prefix), model=[ddp],
        data_iterator=microbatches(dataset, first_sample, args.micro_batch_size, args.num_microbatches),
        num_microbatches=args.num_microbatches, seq_length=args.seq_length + ddp.module.num_meta_tokens,
        micro_batch_size=args.micro_batch_size, forward_only=forward_only)
    return global_batch_loss([r["lm loss"] for r in results] if parallel_state.is_pipeline_last_stage() else [],
                             exit_requested)


def evaluate(args, ddp, valid, iteration: int) -> float:
    ddp.eval()
    losses = [run_batches(args, ddp, valid, (iteration // args.eval_interval * args.eval_iters + i)
                          * args.global_batch_size, forward_only=True)[0] for i in range(args.eval_iters)]
    ddp.train()
    return sum(losses) / len(losses)


def train(args, step_callback=None) -> dict:
    """Build everything, resume if possible, train; returns a summary (final iteration, losses, last validation
    loss or None).

    ``step_callback(iteration, model, optimizer)``, if given, runs after every iteration (tests check invariants
    there).
    """
    # --seed decides the initial weights whatever ran before in this process (as Megatron-LM's pretrain seeds in
    # its own initialization): a benchmark's second run, or a notebook's, starts like the first
    runtime.seed_everything(args.seed)
    _, train_data, valid_data = build_data(args, args.seed)
    vocab = train_data.config.tokenizer.vocab_size
    spec, model, ddp, optimizer, scheduler, normalizer = build_model_and_optimizer(args, vocab)
    log(f"model: {arguments.model_name(args)} pattern {spec.config.layer_pattern} | "
        f"{sum(p.numel() for p in model.parameters()):,} parameters on rank {dist.get_rank()} | "
        f"TP {args.tensor_model_parallel_size} PP {args.pipeline_model_parallel_size} "
        f"DP {args.data_parallel_size} | weight norm {'on' if normalizer else 'off'} | "
        f"{len(ddp.bucket_groups)} gradient bucket(s) | meta prefix {meta_prefix_schedule(spec.config, args)}")

    iteration, consumed = 0, 0
    if args.load:
        common = checkpointing.load_checkpoint(args.load, model, optimizer, scheduler)
        if common is not None:
            iteration = common["iteration"]
            consumed = 0 if args.reset_data_position else common["consumed_samples"]
            if common["args"]["seq_length"] != args.seq_length:
                log(f"sequence length changes from {common['args']['seq_length']} to {args.seq_length}")
            log(f"resumed from {common['loaded_from']} at iteration {iteration}")

    tokens_per_iter = args.global_batch_size * args.seq_length
    flops_per_iter = tokens_per_iter * flops.train_flops_per_token(
        spec.config, model.padded_vocab_size, args.seq_length, args.recompute_activations,
        args.recompute_logits, args.micro_batch_size, packed=args.reset_attention_mask,
        prefix_microbatches=args.num_microbatches if meta_prefix_once_per_step(spec.config, args) else 1,
    ) / dist.get_world_size()
    progress = ProgressLog(args.tensorboard_dir, args.log_interval, tokens_per_iter, flops_per_iter,
                           peak_flops_per_second())
    exit_signal = ExitSignal()
    profiler = StepProfiler(args.profile_dir, args.profile_step_start, args.profile_step_end, args.profile_ranks,
                            args.profile)
    skipped_in_a_row, skipped_total, losses = 0, 0, []
    valid_loss = None

    def save():
        if args.save:
            gather_parameters(ddp)
            checkpointing.save_checkpoint(args.save, iteration, model, optimizer, scheduler, {
                "args": vars(args), "consumed_samples": consumed}, keep_last=args.keep_last)
            log(f"saved checkpoint at iteration {iteration} to {args.save}")

    while iteration < args.train_iters:
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        loss, exit_requested = run_batches(args, ddp, train_data, consumed, forward_only=False,
                                           exit_requested=exit_signal.received is not None)
        grad_norm = None
        if math.isfinite(loss):
            _, grad_norm, _ = optimizer.step()
            scheduler.step(increment=args.global_batch_size)
            skipped_in_a_row = 0
        else:
            skipped_in_a_row, skipped_total = skipped_in_a_row + 1, skipped_total + 1
            if skipped_in_a_row >= args.max_consecutive_skipped:
                save()
                raise RuntimeError(f"stopping: {skipped_in_a_row} consecutive iterations with inf/NaN loss "
                                   f"(last at iteration {iteration + 1}); last good state saved")
        iteration += 1
        consumed += args.global_batch_size
        losses.append(loss)
        deviation = normalizer.mean_deviation if normalizer else None
        extra = {} if deviation is None else {"weight-norm-deviation": deviation}
        progress.step(iteration, loss, scheduler.get_lr(optimizer.param_groups[0]), grad_norm, skipped_total, extra)
        profiler.step(iteration)
        if step_callback is not None:
            gather_parameters(ddp)
            step_callback(iteration, model, optimizer)

        if valid_data is not None and args.eval_iters and iteration % args.eval_interval == 0:
            val = valid_loss = evaluate(args, ddp, valid_data, iteration)
            progress.scalar("validation/lm-loss", val, iteration)
            progress.scalar("validation/perplexity", math.exp(min(val, 30)), iteration)
            log(f"validation at iteration {iteration}: loss {val:.4f} | perplexity {math.exp(min(val, 30)):.2f}")
            progress.restart_timer()
        if exit_requested:
            log(f"exit signal received: saving at iteration {iteration} and exiting")
            save()
            break
        if args.exit_interval and iteration % args.exit_interval == 0:
            save()
            break
        if iteration % args.save_interval == 0 or iteration == args.train_iters:
            save()
            progress.restart_timer()
    gather_parameters(ddp)  # the model handed back is whole
    progress.close()
    profiler.close()
    return {"iteration": iteration, "losses": losses, "valid_loss": valid_loss, "skipped": skipped_total,
            "last_log": progress.last, "profile": profiler.table, "gradient_buckets": len(ddp.bucket_groups),
            "flops_per_token": flops_per_iter * dist.get_world_size() / tokens_per_iter}


def main(argv=None) -> int:
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    try:
        args = arguments.parse_args(argv, world_size=world)
    except arguments.ArgumentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    runtime.initialize(args.tensor_model_parallel_size, args.pipeline_model_parallel_size, seed=args.seed)
    try:
        train(args)
    finally:
        runtime.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
