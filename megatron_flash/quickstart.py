"""End-to-end quickstart: ``python -m megatron_flash.quickstart [--workdir DIR]`` (README command 1).

On a fresh machine (CPU is enough, a GPU is used when present) it runs the whole pipeline on a few MB of real
text, each stage with a banner and the tools' own output:

1. corpus      data_prep/build_sample_corpus.py: this Python's standard library as JSONL (no network)
2. tokenizer   tools/train_tokenizer.py: a small byte-level BPE (a small vocabulary, so the tiny model learns fast)
3. preprocess  tools/preprocess_data.py: train/valid splits to megatron .bin/.idx
4. blend       data_prep/build_blend.py: data_prep/mixtures/sample_corpus.yaml -> the trainer's per-split blend
5. train       python -m megatron_flash.pretrain, the tiny preset, stopped halfway by --exit-interval (checkpoint)
6. resume      the same command with --load: continues from the checkpoint to the end
7. export      tools/convert_to_hf.py (when it exists): a Hugging Face folder
8. generate    a few lines from the exported model with transformers

Everything goes under ``--workdir`` (default ``./quickstart_run``). A rerun skips the stages whose outputs are
complete (``--force`` redoes everything), so an interrupted quickstart continues where it stopped. Takes a few
minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIXTURE = os.path.join("data_prep", "mixtures", "sample_corpus.yaml")
CONVERTER = os.path.join("tools", "convert_to_hf.py")
REQUIRED = ("data_prep/build_sample_corpus.py", "data_prep/build_blend.py", MIXTURE, "tools/train_tokenizer.py",
            "tools/preprocess_data.py")
# Library notices about kernels this machine does not have (Transformer Engine, Apex, Triton on CPU): hidden unless
# --show-warnings, so the trainer's own lines stand out.
QUIET_WARNINGS = ",".join([f"ignore:{m}:UserWarning" for m in (
    "Transformer Engine and Apex are not installed", "Apex is not installed", "Triton is not supported",
    "full scope is deprecated")] + ["ignore:`load_state_dict` is deprecated:FutureWarning"])
TRACKER = "latest_checkpointed_iteration.txt"  # megatron_flash.training.checkpointing.TRACKER (not imported: slow)
PROMPTS = ("def ", "import os\n", "class ", "The ")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class QuickstartError(RuntimeError):
    """A stage failed; the message says which, with the command to rerun by hand."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_flash.quickstart", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workdir", default="quickstart_run", help="folder for every output")
    p.add_argument("--size-mb", type=float, default=4.0, help="sample corpus size")
    p.add_argument("--vocab-size", type=int, default=3072, help="tokenizer vocabulary")
    p.add_argument("--train-iters", type=int, default=300,
                   help="training iterations; the first run stops at half, the resumed run finishes")
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--nproc", type=int, default=1,
                   help="trainer processes (torchrun when > 1): GPUs, or CPU processes (gloo)")
    p.add_argument("--workers", type=int, default=1,
                   help="preprocessing processes (one tokenizes a few MB in seconds)")
    p.add_argument("--skip-export", action="store_true", help="stop after training (no Hugging Face export)")
    p.add_argument("--force", action="store_true", help="redo every stage, even when its outputs are complete")
    p.add_argument("--show-warnings", action="store_true", help="do not hide the libraries' missing-kernel notices")
    return p


class Quickstart:
    def __init__(self, args):
        self.args = args
        self.work = os.path.abspath(args.workdir)
        self.corpus = os.path.join(self.work, "corpus")
        self.tokenizer = os.path.join(self.work, "tokenizer")
        self.data_root = os.path.join(self.work, "data")
        self.blend = os.path.join(self.data_root, "blend.json")
        self.checkpoints = os.path.join(self.work, "checkpoints")
        self.tensorboard = os.path.join(self.work, "tensorboard")
        self.hf = os.path.join(self.work, "hf_model")
        self.stamps = os.path.join(self.work, ".stages")
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
                        PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
        if not args.show_warnings:
            self.env["PYTHONWARNINGS"] = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), QUIET_WARNINGS]))
        self.stage_count = 6 if args.skip_export or not self.has_converter() else 8
        self.stage_number = 0
        self.timings = []  # (stage, start time)

    # --- helpers ----------------------------------------------------------------------------------------------

    @staticmethod
    def has_converter() -> bool:
        return os.path.isfile(os.path.join(REPO, CONVERTER))

    def banner(self, name: str, what: str) -> None:
        self.stage_number += 1
        self.timings.append((name, time.perf_counter()))
        print(f"\n=== [{self.stage_number}/{self.stage_count}] {name}: {what}", flush=True)

    def run(self, stage: str, cmd: list) -> None:
        print("$ " + shlex.join(cmd), flush=True)
        try:
            rc = subprocess.run(cmd, cwd=REPO, env=self.env).returncode
        except OSError as exc:
            raise QuickstartError(f"stage '{stage}': cannot start {cmd[0]}: {exc}") from None
        if rc != 0:
            hint = " (--skip-export leaves the Hugging Face stages out)" if stage == "export" else ""
            raise QuickstartError(f"stage '{stage}' failed (exit status {rc}); its output is above. Command:\n  "
                                  f"{shlex.join(cmd)}\nFix the cause and rerun the quickstart: finished stages are "
                                  f"skipped{hint}.")

    def done(self, stage: str, params: dict) -> bool:
        """True when ``stage`` finished before with the same parameters (and --force is off)."""
        path = os.path.join(self.stamps, stage + ".json")
        if self.args.force or not os.path.isfile(path):
            return False
        try:
            with open(path, encoding="utf-8") as fh:
                return json.load(fh) == params
        except (OSError, ValueError):
            return False

    def mark_done(self, stage: str, params: dict) -> None:
        os.makedirs(self.stamps, exist_ok=True)
        tmp = os.path.join(self.stamps, stage + ".json.partial")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(params, fh)
        os.replace(tmp, os.path.join(self.stamps, stage + ".json"))

    def forget(self, *stages: str) -> None:
        """Later stages depend on this one's outputs: redo them too."""
        for stage in stages:
            path = os.path.join(self.stamps, stage + ".json")
            if os.path.exists(path):
                os.remove(path)

    @staticmethod
    def skipped(what: str) -> None:
        print(f"already done ({what}); skipping", flush=True)

    # --- stages -----------------------------------------------------------------------------------------------

    def corpus_stage(self) -> None:
        params = {"size_mb": self.args.size_mb, "valid_fraction": 0.05}
        self.banner("corpus", f"{self.args.size_mb:g} MB of this Python's standard library as JSONL")
        if self.done("corpus", params) and os.path.isfile(os.path.join(self.corpus, "train.jsonl")):
            return self.skipped(self.corpus)
        self.forget("tokenizer", "preprocess", "blend", "train")
        self.run("corpus", [sys.executable, "data_prep/build_sample_corpus.py", "--output-dir", self.corpus,
                            "--size-mb", str(self.args.size_mb), "--valid-fraction", "0.05"])
        for split in ("train", "valid"):
            if not os.path.isfile(os.path.join(self.corpus, f"{split}.jsonl")):
                raise QuickstartError(f"stage 'corpus': {split}.jsonl was not written in {self.corpus}")
        self.mark_done("corpus", params)

    def tokenizer_stage(self) -> None:
        params = {"vocab_size": self.args.vocab_size}
        self.banner("tokenizer", f"byte-level BPE with {self.args.vocab_size} tokens")
        if self.done("tokenizer", params) and os.path.isfile(os.path.join(self.tokenizer, "tokenizer.json")):
            return self.skipped(self.tokenizer)
        self.forget("preprocess", "blend", "train")
        shutil.rmtree(self.tokenizer, ignore_errors=True)
        self.run("tokenizer", [sys.executable, "tools/train_tokenizer.py",
                               "--input", os.path.join(self.corpus, "train.jsonl"),
                               "--tokenizer-type", "HuggingFaceTokenizer", "--vocab-size", str(self.args.vocab_size),
                               "--output", self.tokenizer])
        self.mark_done("tokenizer", params)

    def preprocess_stage(self) -> None:
        self.banner("preprocess", "tokenize the train and valid splits into megatron .bin/.idx files")
        params = {"vocab_size": self.args.vocab_size}
        prefixes = [os.path.join(self.data_root, "sample", split) for split in ("train", "valid")]
        if self.done("preprocess", params) and all(os.path.isfile(p + "_text_document.idx") for p in prefixes):
            return self.skipped(os.path.join(self.data_root, "sample"))
        self.forget("blend", "train")
        for split, prefix in zip(("train", "valid"), prefixes):
            self.run("preprocess", [sys.executable, "tools/preprocess_data.py",
                                    "--input", os.path.join(self.corpus, f"{split}.jsonl"), "--output-prefix", prefix,
                                    "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", self.tokenizer,
                                    "--append-eod", "--workers", str(self.args.workers), "--overwrite",
                                    "--no-progress-bar"])
        self.mark_done("preprocess", params)

    def blend_stage(self) -> None:
        self.banner("blend", f"{MIXTURE} -> {self.blend}")
        if self.done("blend", {}) and os.path.isfile(self.blend):
            return self.skipped(self.blend)
        self.run("blend", [sys.executable, "data_prep/build_blend.py", MIXTURE, "--data-root", self.data_root,
                           "--format", "per-split-json", "--output", self.blend])
        self.mark_done("blend", {})

    def trainer_command(self, extra: list) -> list:
        a = self.args
        if a.nproc > 1:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(a.nproc),
                        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m",
                        "megatron_flash.pretrain"]
        else:
            launcher = [sys.executable, "-m", "megatron_flash.pretrain"]
        interval = max(1, a.train_iters // 3)
        return launcher + [
            "--preset", "tiny", "--per-split-data-args-path", self.blend,
            "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", self.tokenizer,
            "--seq-length", str(a.seq_length), "--micro-batch-size", str(a.micro_batch_size),
            "--train-iters", str(a.train_iters), "--lr", str(a.lr), "--min-lr", str(a.lr / 10),
            "--lr-decay-style", "cosine", "--lr-warmup-iters", str(max(1, a.train_iters // 10)),
            "--weight-decay", "0", "--log-interval", str(max(1, min(10, a.train_iters // 10))),
            "--eval-interval", str(interval), "--eval-iters", "4",
            "--save", self.checkpoints, "--load", self.checkpoints, "--save-interval", str(interval),
            "--keep-last", "2", "--tensorboard-dir", self.tensorboard,
            "--data-cache-path", os.path.join(self.work, "data_cache"),
        ] + extra

    def latest_iteration(self):
        path = os.path.join(self.checkpoints, TRACKER)
        if not os.path.isfile(path):
            return None
        text = open(path, encoding="utf-8").read().strip()
        return int(text) if text.isdigit() else None

    def train_stages(self) -> None:
        a = self.args
        half = max(1, a.train_iters // 2)
        params = {k: getattr(a, k) for k in ("train_iters", "seq_length", "micro_batch_size", "lr", "vocab_size",
                                             "size_mb", "nproc")}
        if not self.done("train", params):
            # new settings or new data: start over (a checkpoint of other settings would not load)
            shutil.rmtree(self.checkpoints, ignore_errors=True)
            shutil.rmtree(self.tensorboard, ignore_errors=True)
            self.forget("export")
            self.mark_done("train", params)  # records the settings the checkpoints below belong to

        self.banner("train", f"the tiny preset for {half} of {a.train_iters} iterations, then save and exit "
                             f"(--exit-interval {half})")
        latest = self.latest_iteration()
        if latest is not None and latest >= half:
            self.skipped(f"checkpoint at iteration {latest} in {self.checkpoints}")
        else:
            self.run("train", self.trainer_command(["--exit-interval", str(half)]))
            latest = self.latest_iteration()
            if latest != half:
                raise QuickstartError(f"stage 'train': expected a checkpoint at iteration {half} in "
                                      f"{self.checkpoints}, found {latest}")

        self.banner("resume", f"the same command with --load {self.checkpoints}: continue to iteration "
                              f"{a.train_iters}")
        if self.latest_iteration() == a.train_iters:
            self.skipped(f"checkpoint at iteration {a.train_iters}")
        else:
            self.run("resume", self.trainer_command([]))
            if self.latest_iteration() != a.train_iters:
                raise QuickstartError(f"stage 'resume': expected a checkpoint at iteration {a.train_iters} in "
                                      f"{self.checkpoints}, found {self.latest_iteration()}")
        print(f"\nTensorBoard logs: {self.tensorboard}\n  view them with: tensorboard --logdir {self.tensorboard}",
              flush=True)

    def export_stage(self) -> None:
        self.banner("export", f"{CONVERTER} -> {self.hf}")
        params = {"iteration": self.latest_iteration()}
        if self.done("export", params) and os.path.isfile(os.path.join(self.hf, "config.json")):
            return self.skipped(self.hf)
        self.run("export", [sys.executable, CONVERTER, "--load", self.checkpoints, "--output", self.hf,
                            "--tokenizer", self.tokenizer, "--dtype", "fp32", "--force", "--no-progress"])
        self.mark_done("export", params)

    def generate_stage(self) -> None:
        self.banner("generate", "a few lines from the exported model with transformers")
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as exc:
            raise QuickstartError(f"stage 'generate': transformers is not importable ({exc}); "
                                  "pip install -e . installs it") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.hf, trust_remote_code=True)
            model = AutoModelForCausalLM.from_pretrained(self.hf, trust_remote_code=True, dtype=torch.float32)
        except Exception as exc:  # noqa: BLE001 - any load failure is reported with the folder
            raise QuickstartError(f"stage 'generate': cannot load {self.hf} with transformers: {exc!r} "
                                  "(--skip-export leaves the Hugging Face stages out)") from exc
        model.eval()
        torch.manual_seed(0)
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=40, do_sample=True, temperature=0.8, top_k=40,
                                     pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            text = tokenizer.decode(out[0], skip_special_tokens=True)
            print(f"--- prompt {prompt!r}\n{text}", flush=True)

    # --- all --------------------------------------------------------------------------------------------------

    def check(self) -> None:
        missing = [p for p in REQUIRED if not os.path.isfile(os.path.join(REPO, p))]
        if missing:
            raise QuickstartError(
                f"the quickstart needs the repository's data_prep/ and tools/, but {', '.join(missing)} "
                f"is missing under {REPO}: install from a clone with `pip install -e .` and run it there")
        a = self.args
        for name in ("train_iters", "seq_length", "micro_batch_size", "nproc", "workers"):
            if getattr(a, name) < 1:
                raise QuickstartError(f"--{name.replace('_', '-')} must be at least 1")
        if a.train_iters < 2:
            raise QuickstartError("--train-iters must be at least 2 (the first run stops halfway, then resumes)")
        if a.size_mb <= 0:
            raise QuickstartError("--size-mb must be positive")
        os.makedirs(self.work, exist_ok=True)

    def main(self) -> None:
        start = time.perf_counter()
        self.check()
        print(f"megatron_flash quickstart in {self.work} (repository {REPO})", flush=True)
        self.corpus_stage()
        self.tokenizer_stage()
        self.preprocess_stage()
        self.blend_stage()
        self.train_stages()
        if self.args.skip_export:
            print("\n--skip-export: no Hugging Face export", flush=True)
        elif not self.has_converter():
            print(f"\n{CONVERTER} is not in this checkout: skipping the Hugging Face export and generation",
                  flush=True)
        else:
            self.export_stage()
            self.generate_stage()
        end = time.perf_counter()
        starts = [t for _, t in self.timings] + [end]
        print("\nstage times: " + ", ".join(f"{name} {starts[i + 1] - t:.0f} s"
                                           for i, (name, t) in enumerate(self.timings)))
        print(f"quickstart finished in {end - start:.0f} s. Outputs in {self.work}:\n"
              f"  checkpoints  {self.checkpoints}\n  tensorboard  {self.tensorboard}"
              + (f"\n  hf model     {self.hf}" if os.path.isdir(self.hf) else ""), flush=True)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        Quickstart(args).main()
    except QuickstartError as exc:
        print(f"\nquickstart error: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("\nquickstart interrupted; rerun it to continue (finished stages are skipped)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
