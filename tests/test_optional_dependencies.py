"""megatron_flash imports and runs on a machine without GPU kernels: no fla, triton, mamba_ssm, causal_conv1d or
Transformer Engine (the setup.py 'gpu'/'te' extras)."""

import subprocess
import sys
import textwrap

BLOCKED = ["fla", "triton", "mamba_ssm", "causal_conv1d", "transformer_engine", "flash_attn"]


def test_model_runs_without_optional_gpu_packages():
    script = textwrap.dedent(f"""
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in {BLOCKED!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}} (blocked for this test)")
                return None

        sys.meta_path.insert(0, Block())
        import megatron_flash
        from megatron_flash import runtime
        from megatron_flash.models import builder
        import torch
        if __name__ == "__main__":
            runtime.initialize()
            spec = builder.resolve("tiny")
            model = builder.build_model(spec, 16)
            tokens = torch.randint(0, spec.vocab_size, (1, 17))
            loss = model(tokens[:, :-1], labels=tokens[:, 1:]).mean()
            loss.backward()
            blocked = [m for m in sys.modules if m.split(".")[0] in {BLOCKED!r}]
            assert not blocked, blocked
            print("ok", float(loss))
            runtime.shutdown()
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
