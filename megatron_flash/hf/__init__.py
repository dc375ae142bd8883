"""Hugging Face modeling code for exported Nemotron-Flash checkpoints.

``configuration_nemotron_flash.py`` and ``modeling_nemotron_flash.py`` are copied verbatim into every exported
checkpoint folder and loaded there with ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``
(config.json's ``auto_map`` points at them). They therefore import only torch and transformers (fla optionally,
on CUDA) and nothing from megatron_flash; this package exists so that the exporter and the tests can import them.
"""
