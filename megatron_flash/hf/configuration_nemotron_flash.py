# coding=utf-8
"""Nemotron-Flash configuration, with the field names and values of NVIDIA's released checkpoints.

Shipped verbatim next to exported weights and loaded with ``trust_remote_code=True``; it imports only
``transformers``.

``layer_types`` holds one letter code per block, as released:

* ``"deltanet"``: DeltaNet token mixer (module ``gla``),
* ``"m2"``: Mamba2 token mixer (module ``mamba``),
* ``"a"``: softmax attention with RoPE (module ``self_attn``),
* ``"f"``: SwiGLU feed-forward block (module ``ffn``).

transformers 5 validates ``config.layer_types`` against its own vocabulary (``"full_attention"``,
``"linear_attention"``, ...) in ``PreTrainedConfig.validate_layer_type``. That check runs at the end of
``PreTrainedConfig.__init__`` and again in ``save_pretrained`` (through ``validate()``). NVIDIA's released class
sets ``layer_types`` before calling the parent ``__init__`` and so cannot be built under transformers 5. This
class keeps the released name and values by (1) assigning ``layer_types`` only after the parent ``__init__`` has
run its validation, and (2) overriding ``validate`` so that a save checks our vocabulary instead of
transformers'.
"""

import inspect

from transformers import PretrainedConfig

NEMOTRON_FLASH_LAYER_TYPES = ("deltanet", "m2", "a", "f")

# The block pattern of the released Nemotron-Flash-1B, used when no layer_types are given.
_NEMOTRON_FLASH_1B_LAYER_TYPES = ["deltanet", "f", "m2", "f", "a", "f", "m2", "f"] * 2 + [
    "deltanet", "f", "m2", "f", "deltanet", "f", "m2", "f",
]


class NemotronFlashConfig(PretrainedConfig):
    """Configuration of :class:`NemotronFlashForCausalLM`; defaults are the released Nemotron-Flash-1B values.

    Fields used by the model code: ``vocab_size``, ``hidden_size``, ``layer_types`` (``num_hidden_layers`` is
    derived from it), ``num_attention_heads`` and ``num_key_value_heads`` (attention and DeltaNet heads; head dim
    is ``hidden_size // num_attention_heads``), ``ffn_expand_ratio`` (FFN width = ratio * hidden_size),
    ``num_memory_tokens``, ``rms_norm_eps``, ``mamba_d_state``, ``mamba_d_conv``, ``mamba_expand``,
    ``mamba2_headdim``, ``rope_theta``, ``sliding_window``, ``d_conv`` (DeltaNet short-convolution width),
    ``tie_word_embeddings``, ``initializer_range``. The remaining released fields (``attn_implementation_new``,
    ``hybrid_decoder_layer``, ``kq_norm``, ...) are stored so that config.json round-trips exactly; the model
    refuses values it does not implement rather than silently ignoring them.
    """

    model_type = "nemotron_flash"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=131072,
        hidden_size=2048,
        intermediate_size=0,
        ffn_expand_ratio=3,
        layer_types=None,
        num_hidden_layers=None,
        num_attention_heads=16,
        num_key_value_heads=4,
        num_memory_tokens=256,
        hidden_act="silu",
        mlp_hidden_act="silu",
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        mamba_d_state=128,
        mamba_d_conv=4,
        mamba_expand=2,
        mamba2_headdim=64,
        mamba_conv_bias=True,
        mamba_proj_bias=False,
        d_conv=4,
        rope=True,
        rope_type=None,
        rope_theta=10000.0,
        max_position_embeddings=262144,
        kq_norm="none",
        attn_hidden_size=-1,
        kq_head_dim=-1,
        v_head_dim=-1,
        sliding_window=None,
        global_attn_idx=None,
        attention_dropout=0.0,
        attn_implementation_new="fused_mha",
        hybrid_decoder_layer="mamba",
        use_cache=True,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        architectures=None,
        auto_map=None,
        **kwargs,
    ):
        if layer_types is None:
            layer_types = list(_NEMOTRON_FLASH_1B_LAYER_TYPES)
        layer_types = list(layer_types)
        _check_layer_types(layer_types)
        if num_hidden_layers is not None and num_hidden_layers != len(layer_types):
            raise ValueError(f"num_hidden_layers={num_hidden_layers} but layer_types has {len(layer_types)} entries")

        # The parent __init__ runs first: under transformers 5 it validates layer_types against its own names, so
        # ours must not exist yet (see the module docstring); under transformers 4 it would reset
        # tie_word_embeddings and the token ids to its defaults. architectures is a parent field, so it goes through.
        super().__init__(
            architectures=["NemotronFlashForCausalLM"] if architectures is None else architectures, **kwargs
        )
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.ffn_expand_ratio = ffn_expand_ratio
        self.num_hidden_layers = len(layer_types)
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.num_memory_tokens = num_memory_tokens
        self.hidden_act = hidden_act
        self.mlp_hidden_act = mlp_hidden_act
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.mamba_d_state = mamba_d_state
        self.mamba_d_conv = mamba_d_conv
        self.mamba_expand = mamba_expand
        self.mamba2_headdim = mamba2_headdim
        self.mamba_conv_bias = mamba_conv_bias
        self.mamba_proj_bias = mamba_proj_bias
        self.d_conv = d_conv
        self.rope = rope
        self.rope_type = rope_type
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.kq_norm = kq_norm
        self.attn_hidden_size = attn_hidden_size
        self.kq_head_dim = kq_head_dim
        self.v_head_dim = v_head_dim
        self.sliding_window = sliding_window
        self.global_attn_idx = [] if global_attn_idx is None else list(global_attn_idx)
        self.attention_dropout = attention_dropout
        self.attn_implementation_new = attn_implementation_new
        self.hybrid_decoder_layer = hybrid_decoder_layer
        self.use_cache = use_cache
        self.tie_word_embeddings = tie_word_embeddings
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.auto_map = (
            {
                "AutoConfig": "configuration_nemotron_flash.NemotronFlashConfig",
                "AutoModel": "modeling_nemotron_flash.NemotronFlashModel",
                "AutoModelForCausalLM": "modeling_nemotron_flash.NemotronFlashForCausalLM",
            }
            if auto_map is None
            else auto_map
        )
        self.layer_types = layer_types

    def validate(self):
        """Run transformers' config validators, with our ``validate_layer_type`` in place of the parent's.

        transformers binds its validators to the parent class, so overriding ``validate_layer_type`` alone would
        not reach ``save_pretrained``; here each ``validate_*`` method is looked up on the instance instead.
        """
        for name in sorted(dir(type(self))):
            if name.startswith("validate_") and callable(getattr(type(self), name)):
                getattr(self, name)()

    def validate_layer_type(self):
        _check_layer_types(self.layer_types)
        if self.num_hidden_layers != len(self.layer_types):
            raise ValueError(
                f"num_hidden_layers={self.num_hidden_layers} but layer_types has {len(self.layer_types)} entries"
            )

    # The parent's torch_dtype property logs a deprecation warning, and its to_diff_dict reads every key of
    # to_dict() back through getattr, so the alias written below would warn on every save or repr.
    @property
    def torch_dtype(self):
        return self.dtype

    @torch_dtype.setter
    def torch_dtype(self, value):
        self.dtype = value

    def to_diff_dict(self):
        # transformers leaves out values equal to its own base defaults (under transformers 4, for example,
        # tie_word_embeddings=True and null token ids); a released config.json lists every Nemotron-Flash field.
        diff = super().to_diff_dict()
        full = self.to_dict()
        for name in inspect.signature(NemotronFlashConfig.__init__).parameters:
            if name in full:
                diff.setdefault(name, full[name])
        return diff

    def to_dict(self):
        output = super().to_dict()
        # transformers 5 writes the dtype as "dtype"; the released config.json (and transformers 4 readers) use
        # "torch_dtype". Write both; on load transformers 5 keeps "dtype" and drops the alias.
        if output.get("dtype") is not None:
            output["torch_dtype"] = output["dtype"]
        return output


def _check_layer_types(layer_types):
    unknown = sorted({t for t in layer_types if t not in NEMOTRON_FLASH_LAYER_TYPES})
    if unknown:
        raise ValueError(f"layer_types entries must be in {NEMOTRON_FLASH_LAYER_TYPES}, got {unknown}")
