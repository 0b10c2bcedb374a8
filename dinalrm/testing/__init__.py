"""Tiny, real SD3 components and tiny datasets built offline from fixed seeds, shared by tests, benchmarks, examples.

Every component is a genuine diffusers/transformers class with a small config, so code exercised against these
behaves as it would against `stabilityai/stable-diffusion-3.5-medium` (same classes, same dimension chain),
without the Hub and in seconds on a CPU. `dinalrm.testing.models` builds the models,
`dinalrm.testing.datasets` writes tiny preference datasets and benchmarks in their published layouts (the real
writer of the canonical pair schema, `write_canonical_pairs`, lives next to its reader in `dinalrm.data`).

Public names are imported lazily on first use (see `dinalrm._lazy`), so that `python -m dinalrm.testing.warm_python`
imports nothing heavy before its preload.
"""

from .._lazy import lazy_exports


__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "datasets": (
            "PREFERENCE_FORMATS",
            "TINY_BENCHMARKS",
            "make_tiny_image_pair",
            "write_tiny_benchmarks",
            "write_tiny_preference_dataset",
        ),
        "hub_cache": (
            "add_to_hub_cache",
            "save_tiny_sd3_base",
        ),
        "models": (
            "build_tiny_qwen_tokenizer",
            "build_tiny_tokenizers",
            "get_tiny_dinalrm_pipeline",
            "get_tiny_dinalrm_reward_model",
            "get_tiny_flux_components",
            "get_tiny_sd3_components",
            "get_tiny_sd3_pipeline",
            "get_tiny_zimage_components",
            "medium_transformer_config",
            "save_tiny_clip",
            "save_tiny_dinalrm_repo",
            "save_tiny_sd3_pipeline",
            "tiny_flux_transformer_config",
            "tiny_transformer_config",
            "tiny_zimage_transformer_config",
            "torch_threads",
        ),
    },
)
