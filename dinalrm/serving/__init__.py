"""Serving scores: the batch-scoring job behind `dinalrm score` (`scoring`: rows in, scores and ranks out, resume),
the HTTP server behind `dinalrm serve` (`server`) and its Ray Serve deployment (`ray_serve`).

Public names are imported lazily on first use (see `dinalrm._lazy`).
"""

from .._lazy import lazy_exports


__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "ray_serve": (
            "build_deployment",
            "run_ray",
        ),
        "scoring": (
            "COLUMNS",
            "IMAGE_SUFFIXES",
            "NO_MATCH",
            "SETTINGS_SUFFIX",
            "PAIR_COLUMNS",
            "Row",
            "output_row",
            "row_keys",
            "Skips",
            "expand_images",
            "rows_from_images",
            "rows_from_file",
            "competition_ranks",
            "finish_rows",
            "format_rows",
            "OutputFile",
            "BUNDLED_TINY_MODEL",
            "ScoringSettings",
            "noise_levels",
            "collect_rows",
            "load_row_image",
            "prompt_batches",
            "score_images",
            "normalized_rewards",
            "ScoringJob",
            "pipeline_probability",
            "score_rows",
            "ModelUnavailableError",
            "LoadedModel",
            "load_scoring_pipeline",
            "device_problem",
            "default_device",
            "default_dtype",
        ),
        "server": (
            "PROTOCOL_VERSION",
            "PROTOCOL_HEADER",
            "LATENT_TENSORS",
            "FLOAT_DTYPES",
            "DTYPES",
            "RequestError",
            "ServeOptions",
            "load_pipeline",
            "parse_latent_request",
            "seeded_noise",
            "score_latent_batch",
            "latent_batch_key",
            "parse_image_json",
            "check_image_request",
            "score_image_request",
            "ScoreBatcher",
            "RewardServer",
            "create_app",
            "options_from_args",
        ),
    },
)
