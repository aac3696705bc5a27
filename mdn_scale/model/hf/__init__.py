"""The HF transformers model (configuration_mdn.py, modeling_mdn.py): copied verbatim into every
exported folder as trust_remote_code modules, so they import only torch and transformers
(and mdn_kernels when installed, for the chunkwise prefill)."""
