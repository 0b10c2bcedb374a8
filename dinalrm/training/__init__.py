"""Training the reward model: aspect-ratio buckets, image-pair datasets, the compact feature cache, resumable
checkpoints, the preference step (`utils`) and the LRM trainer's pieces (`lrm`).

Public names are imported lazily on first use (see `dinalrm._lazy`).
"""

from .._lazy import lazy_exports


__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "buckets": (
            "ASPECT_RATIO_BUCKETS",
            "BucketSet",
            "BucketBatchSampler",
            "buckets_for_model",
        ),
        "checkpointing": (
            "CHECKPOINT_PREFIX",
            "PARTIAL_PREFIX",
            "TRAINING_STATE",
            "LOCK_FILE",
            "CheckpointError",
            "save_checkpoint",
            "load_checkpoint",
            "nonfinite_tensors",
            "verify_checkpoint",
            "remove_partial_checkpoints",
            "list_checkpoints",
            "resolve_checkpoint",
            "resume_from",
            "remove_old_checkpoints",
            "save_ema",
            "load_ema",
            "register_checkpoint_hooks",
            "ACCELERATE_PICKLE_SUFFIXES",
            "convert_accelerate_pickles",
            "restore_accelerate_pickles",
            "OutputDirLock",
        ),
        "feature_cache": (
            "CACHE_INFO",
            "CACHE_FORMAT_VERSION",
            "FINGERPRINT_SETTINGS",
            "cache_fingerprint",
            "read_cache_info",
            "write_feature_cache",
            "CachedPairDataset",
            "collate_cached_pairs",
            "read_valid_cache_info",
            "build_feature_cache",
        ),
        "lrm": (
            "OFFICIAL_RECIPE",
            "MPCF_STRATEGIES",
            "MPCF_TIE_THRESHOLDS",
            "MPCF_COLUMNS",
            "add_lrm_args",
            "apply_official_recipe",
            "check_lrm_args",
            "build_lrm",
            "timestep_grid",
            "read_mpcf_scores",
            "mpcf_filter",
            "LRMPairDataset",
            "collate_lrm_pairs",
            "encode_lrm_pairs",
            "lrm_preference_step",
            "load_encoding_pipeline",
            "lrm_validation_accuracy",
        ),
        "pair_datasets": (
            "RUNTIME_SKIP",
            "ImagePairDataset",
            "collate_image_pairs",
            "encode_pair_latents",
            "encode_image_pairs",
        ),
        "utils": (
            "WEIGHTING_SCHEMES",
            "seeded_generator",
            "sample_noise_levels",
            "parameter_digest",
            "StepOutput",
            "repeat_prompts",
            "preference_step",
        ),
    },
)
