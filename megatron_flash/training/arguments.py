"""Command-line flags in Megatron-LM's names, YAML config files, and the checks run before any work starts.

``python -m megatron_flash.pretrain --config run.yaml --lr 3e-4`` reads run.yaml (keys are flag names, with dashes or
underscores) and lets the command line override it. Unknown keys and flags, and contradictory settings, stop the
run with a message naming the flag (and the file).
"""

from __future__ import annotations

import argparse
import os

import yaml

from megatron_flash import patterns, presets


DEFAULT_PRESET = "tiny"


class ArgumentError(ValueError):
    """A bad or contradictory setting; raised before any distributed work starts."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_flash.pretrain", allow_abbrev=False,
                                description="Pretrain a Nemotron-Flash hybrid model with megatron-core.")
    p.add_argument("--config", help="YAML file of flag values; flags on the command line override it")

    g = p.add_argument_group("model")
    shape = g.add_mutually_exclusive_group()
    shape.add_argument("--preset", choices=sorted(presets.PRESETS),
                       help=f"model shape (megatron_flash/presets.py): the released 1B / 3B, or a seconds-on-CPU "
                            f"tiny model (default: {DEFAULT_PRESET}, unless --preset-file)")
    shape.add_argument("--preset-file", metavar="PATH",
                       help="model shape from a JSON file of preset fields, or one holding them under "
                            "\"preset_fields\" (an architecture-search candidate.json)")
    g.add_argument("--pattern", help="layer pattern overriding the preset's, e.g. 'DFMFAF' (see docs/cli.md)")
    g.add_argument("--num-meta-tokens", type=int, help="override the preset's meta-token count")
    g.add_argument("--sliding-window", type=int, help="window of 'S' (sliding-window attention) layers")
    g.add_argument("--untie-embeddings", action="store_true", help="separate input embedding and output weights")
    g.add_argument("--ssd-backend", default="auto", help="Mamba2 scan: auto, mamba_ssm, fla, torch, torch_compile")
    g.add_argument("--mamba-chunk-size", type=int,
                   help="Mamba2 scan's chunk length (default: the preset's, 128 for the 1B and 3B); changes speed, "
                        "not the result (without mamba_ssm, 64 is ~3%% faster per Mamba2 layer)")
    g.add_argument("--delta-rule-backend", default="auto", help="DeltaNet: auto, fla, torch")
    g.add_argument("--short-conv-backend", default="auto",
                   help="DeltaNet's and Mamba2's short convs: auto (triton on GPUs, torch on the CPU), triton, fla, "
                        "torch")
    g.add_argument("--recompute-activations", action="store_true", help="recompute each layer in backward")
    g.add_argument("--recompute-logits", action="store_true",
                   help="recompute the output layer's logits in backward instead of keeping softmax - onehot (2 "
                        "bytes per token and vocabulary row: 7.3 GiB at 29696 tokens of a 131072 vocabulary); one "
                        "more output-layer matmul")
    g.add_argument("--no-share-meta-rows", dest="share_meta_rows", action="store_false",
                   help="the FFN computes the meta tokens' rows for every sequence, instead of once per micro-batch "
                        "(they are the same in every sequence: layers/shared_prefix.py); the result is the same")
    g.add_argument("--no-share-meta-prefix", dest="share_meta_prefix_in_mixers", action="store_false",
                   help="DeltaNet and Mamba2 run the meta tokens for every sequence, instead of once per micro-batch "
                        "with each sequence's text from the states they leave (layers/shared_prefix.py); the result "
                        "is the same. Sequence parallelism, packed documents and dropout always run them per sequence")
    g.add_argument("--no-meta-prefix-once-per-step", dest="meta_prefix_once_per_step", action="store_false",
                   help="the layers that share the meta rows compute their results on them in every micro-batch, "
                        "instead of taking them from one pass per optimizer step (layers/shared_prefix.py: "
                        "MetaPrefix; it applies without pipeline parallelism and layer recomputation, where a "
                        "micro-batch shares its meta rows); the result is the same")
    g.add_argument("--no-gradient-accumulation-fusion", dest="gradient_accumulation_fusion", action="store_false",
                   help="weight gradients as bf16 tensors that megatron's DDP then adds into the fp32 main gradients, "
                        "instead of accumulated into them by the weight-gradient matmul itself (ops/wgrad.py)")
    g.add_argument("--transformer-impl", default="local", choices=["local", "transformer_engine"],
                   help="layer specs: local (megatron + torch SDPA) or Transformer Engine's linears, norms and "
                        "attention (not yet exercised by our tests: no TE on our machines)")
    g.add_argument("--use-cpu-initialization", action="store_true",
                   help="initialize on the CPU, identically under any TP/PP layout (always on without a GPU)")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="reduce each bucket of gradients over data-parallel ranks as soon as backward fills it, "
                        "overlapping the rest of backward")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="with the distributed optimizer: gather each bucket's updated parameters during the next "
                        "forward, just before the first module that reads them (needs --use-distributed-optimizer "
                        "and --overlap-grad-reduce)")
    g.add_argument("--ddp-bucket-size", type=int,
                   help="parameters per gradient bucket with --overlap-grad-reduce (default: megatron's, "
                        "max(40M, 1M x data-parallel size)); without it the gradients are one bucket")

    g = p.add_argument_group("batch and length")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=None, help="default: micro-batch x data-parallel size")
    g.add_argument("--seq-length", type=int, default=256)
    g.add_argument("--train-iters", type=int)
    g.add_argument("--train-tokens", type=int, help="alternative to --train-iters: tokens to train on")

    g = p.add_argument_group("optimizer and schedule")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", default="cosine", choices=["cosine", "wsd", "constant", "linear"])
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int, help="default: the training length")
    g.add_argument("--lr-wsd-decay-iters", type=int, help="WSD: length of the final decay (default 10%% of decay)")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--no-weight-norm", dest="weight_norm", action="store_false",
                   help="turn off the per-step weight normalization")
    g.add_argument("--weight-norm-embeddings", action="store_true",
                   help="also give the (tied) embedding / output matrix unit rows")
    g.add_argument("--max-consecutive-skipped", type=int, default=10,
                   help="stop after this many consecutive steps with inf/NaN loss")
    g.add_argument("--override-opt-param-scheduler", action="store_true",
                   help="on resume, take the LR schedule from the flags instead of the checkpoint")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="*", help="Megatron blend: [weight] prefix [weight] prefix ...")
    g.add_argument("--split", default="98,2,0")
    g.add_argument("--per-split-data-args-path", help="JSON {train: [...], valid: [...], test: [...]}")
    g.add_argument("--mock-data", action="store_true", help="random tokens (no files)")
    g.add_argument("--tokenizer-type", default="HuggingFaceTokenizer")
    g.add_argument("--tokenizer-model", help="tokenizer folder / tokenizer.json / SentencePiece .model")
    g.add_argument("--vocab-size", type=int, help="vocabulary for --mock-data (default: the preset's)")
    g.add_argument("--data-cache-path", help="folder for megatron's dataset index cache")
    g.add_argument("--reset-attention-mask", action="store_true",
                   help="documents (ended by EOD) do not see each other: each is computed as if alone, with its "
                        "own meta tokens (needs pipeline size 1 and no sequence parallelism)")
    g.add_argument("--reset-data-position", action="store_true",
                   help="on resume, start the data from the beginning (e.g. a new phase's blend)")

    g = p.add_argument_group("checkpoints, evaluation and logging")
    g.add_argument("--save", help="checkpoint folder")
    g.add_argument("--load", help="resume from the latest checkpoint here (may equal --save)")
    g.add_argument("--save-interval", type=int, default=1000)
    g.add_argument("--keep-last", type=int, default=3, help="checkpoints kept in --save (0: all)")
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=10)
    g.add_argument("--tensorboard-dir")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--seed", type=int, default=1234,
                   help="random seed: initial weights, data order, dropout; every run starts from it, even a later one "
                        "in the same process")
    g.add_argument("--exit-interval", type=int, help="save and exit after this iteration (testing resume)")
    g.add_argument("--profile", action="store_true",
                   help="torch profiler over iterations [--profile-step-start, --profile-step-end)")
    g.add_argument("--profile-step-start", type=int, default=10,
                   help="iterations completed before profiling starts")
    g.add_argument("--profile-step-end", type=int, default=12,
                   help="iteration after which profiling stops and the table is written")
    g.add_argument("--profile-ranks", type=int, nargs="+", default=[0], help="global ranks that profile")
    g.add_argument("--profile-dir", help="where the trace and kernel table go (default: --tensorboard-dir)")
    return p


def _config_defaults(parser: argparse.ArgumentParser, path: str) -> dict:
    if not os.path.isfile(path):
        raise ArgumentError(f"--config {path}: no such file")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise ArgumentError(f"--config {path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ArgumentError(f"--config {path}: expected a mapping of flag names to values")
    known = {a.dest for a in parser._actions}
    out = {}
    for key, value in data.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in known or dest == "config":
            raise ArgumentError(f"--config {path}: unknown key {key!r} (not a flag of this trainer)")
        out[dest] = value
    return out


def parse_args(argv=None, world_size: int = 1) -> argparse.Namespace:
    """Parse flags (and --config), fill derived values, and check them; ArgumentError on any problem."""
    parser = build_parser()
    try:
        pre, _ = parser.parse_known_args(argv)
        if pre.config:
            parser.set_defaults(**_config_defaults(parser, pre.config))
        args = parser.parse_args(argv)
    except SystemExit as exc:
        if exc.code == 0:  # --help
            raise
        raise ArgumentError("invalid command line (see the message above)") from None
    validate(args, world_size)
    return args


def model_preset(args: argparse.Namespace | dict):
    """What models.builder.resolve takes as the preset: the fields of --preset-file, else the --preset name.
    (The fields are kept in the args, so a checkpoint's recorded args, a dict, rebuild the model without the file;
    older checkpoints recorded no preset_fields.)"""
    recorded = args if isinstance(args, dict) else vars(args)
    fields = recorded.get("preset_fields")
    return fields if fields is not None else recorded["preset"]


def model_name(args: argparse.Namespace) -> str:
    """The preset name, or the --preset-file path (for logs)."""
    return args.preset_file or args.preset


def validate(args: argparse.Namespace, world_size: int) -> None:
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if tp < 1 or pp < 1 or world_size % (tp * pp):
        raise ArgumentError(f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
                            f"--pipeline-model-parallel-size {pp}")
    dp = world_size // (tp * pp)
    args.data_parallel_size = dp
    args.preset_fields = None
    if args.preset_file is not None and args.preset is not None:  # e.g. one from --config, the other a flag
        raise ArgumentError(f"give --preset or --preset-file, not both (--preset {args.preset}, --preset-file "
                            f"{args.preset_file})")
    if args.preset_file is None and args.preset is None:
        args.preset = DEFAULT_PRESET
    if args.preset_file:
        try:
            args.preset_fields = presets.load_preset_file(args.preset_file)
        except presets.PresetError as exc:
            raise ArgumentError(f"--preset-file {exc}") from None
    if args.sequence_parallel and tp == 1:
        raise ArgumentError("--sequence-parallel needs --tensor-model-parallel-size > 1")
    if args.overlap_param_gather and not (args.use_distributed_optimizer and args.overlap_grad_reduce):
        raise ArgumentError("--overlap-param-gather needs --use-distributed-optimizer and --overlap-grad-reduce "
                            "(without the latter megatron puts all parameters in one bucket)")
    if args.ddp_bucket_size is not None and (args.ddp_bucket_size < 1 or not args.overlap_grad_reduce):
        raise ArgumentError(f"--ddp-bucket-size {args.ddp_bucket_size}: needs --overlap-grad-reduce (without it "
                            f"the gradients are one bucket) and a positive size")
    if args.pattern is not None:
        try:
            patterns.parse(args.pattern)
        except patterns.PatternError as exc:
            raise ArgumentError(f"--pattern: {exc}") from None
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    if args.global_batch_size % (args.micro_batch_size * dp):
        raise ArgumentError(f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
                            f"{args.micro_batch_size} x data-parallel size {dp}")
    args.num_microbatches = args.global_batch_size // (args.micro_batch_size * dp)
    if (args.train_iters is None) == (args.train_tokens is None):
        raise ArgumentError("give exactly one of --train-iters and --train-tokens")
    if args.train_tokens is not None:
        args.train_iters = -(-args.train_tokens // (args.global_batch_size * args.seq_length))
    if args.train_iters < 1:
        raise ArgumentError(f"--train-iters must be positive, got {args.train_iters}")
    if args.profile:
        if not 0 <= args.profile_step_start < args.profile_step_end <= args.train_iters:
            raise ArgumentError(f"--profile-step-start {args.profile_step_start} and --profile-step-end "
                                f"{args.profile_step_end} must satisfy 0 <= start < end <= --train-iters "
                                f"{args.train_iters}")
        args.profile_dir = args.profile_dir or args.tensorboard_dir
        if not args.profile_dir:
            raise ArgumentError("--profile needs --profile-dir or --tensorboard-dir")
    data_sources = [bool(args.data_path), bool(args.per_split_data_args_path), args.mock_data]
    if sum(data_sources) != 1:
        raise ArgumentError("give exactly one of --data-path, --per-split-data-args-path and --mock-data")
    if not args.mock_data and not args.tokenizer_model:
        raise ArgumentError("--data-path needs --tokenizer-model (the tokenizer the data was made with)")
    for flag in ("micro_batch_size", "seq_length", "log_interval", "eval_interval", "save_interval"):
        if getattr(args, flag) < 1:
            raise ArgumentError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.reset_attention_mask and (pp > 1 or args.sequence_parallel):
        raise ArgumentError("--reset-attention-mask needs --pipeline-model-parallel-size 1 and no "
                            "--sequence-parallel (packed rows change length with the number of documents)")
    if args.min_lr > args.lr:
        raise ArgumentError(f"--min-lr {args.min_lr} is above --lr {args.lr}")
    decay_iters = args.lr_decay_iters or args.train_iters
    if args.lr_warmup_iters >= decay_iters:
        raise ArgumentError(f"--lr-warmup-iters {args.lr_warmup_iters} must be below the {decay_iters} decay "
                            f"iterations (--lr-decay-iters, default --train-iters)")
    if args.save_interval and args.save is None and args.exit_interval:
        raise ArgumentError("--exit-interval saves before exiting: give --save")
    if args.load and not os.path.isdir(args.load) and args.load != args.save:
        raise ArgumentError(f"--load {args.load}: no such folder")
