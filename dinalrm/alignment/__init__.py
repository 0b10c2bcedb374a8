"""Aligning generators with a DiNa-LRM reward: Flow-GRPO reward adapters (`rewards`), the Flow-GRPO SDE step
(`flow_sde`), LPO (`lpo`), generator sampling and prompt encoding (`sampling`), the ReFL step (`refl`), GRPO's
group advantages and clipped update (`grpo`), the pixel-space reward baseline (`pixel_reward`) and curves (`plotting`).

Public names are imported lazily on first use (see `dinalrm._lazy`).
"""

from .._lazy import lazy_exports


__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "flow_sde": ("sde_step",),
        "grpo": (
            "ADVANTAGE_EPS",
            "group_advantages",
            "GRPOLossOutput",
            "grpo_loss",
            "gaussian_kl",
        ),
        "lpo": (
            "OFFICIAL_SIGMA_TABLE",
            "OFFICIAL_VARIANCE_TABLE",
            "OFFICIAL_TABLE_STRIDE",
            "OFFICIAL_LINEAR_RANGE",
            "THRESHOLD_SCHEDULES",
            "OFFICIAL_THRESHOLD_RANGES",
            "dynamic_threshold",
            "official_threshold_fn",
            "CompareOutput",
            "compare_candidates",
            "confidence_compare_fn",
            "LatentReward",
            "CallableReward",
            "LRMReward",
            "DiNaLRMReward",
            "StepDistribution",
            "ddim_step_distribution",
            "sample_candidates",
            "gaussian_log_prob",
            "flow_step_distribution",
            "guided_prediction",
            "LPOSampleOutput",
            "sample_with_candidates",
            "parameters_to_clip",
            "LPOLossOutput",
            "lpo_loss",
        ),
        "pixel_reward": (
            "PixelReward",
            "save_pixel_reward",
            "load_pixel_reward",
        ),
        "plotting": ("plot_curves",),
        "refl": (
            "RewardFn",
            "load_reward_model",
            "ReFLStepOutput",
            "refl_step",
        ),
        "rewards": (
            "flow_grpo_reward",
            "flow_grpo_latent_reward",
        ),
        "sampling": (
            "SamplingSettings",
            "Sampler",
            "encode_generator_prompts",
            "decode_latents",
        ),
    },
)
