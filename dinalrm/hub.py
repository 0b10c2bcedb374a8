"""Assembling the DiNa-LRM Hub repository (a DiffusionPipeline folder): the reward model plus the other parts of its
backbone family's pipeline (SD3, FLUX or Z-Image).

Used by `dinalrm build-hub` ([`build_hub_folder`], from a saved reward model) and by `train_dinalrm.py
--pipeline_output_dir` (at the end of training). The base pipeline's components are loaded one by one, so its transformer is never read.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from huggingface_hub import EvalResult, ModelCard, ModelCardData, create_repo, upload_folder

from dinalrm.data import BENCHMARKS
from modeling_dinalrm import DiNaLRMModel, provenance_name
from pipeline_dinalrm import DiNaLRMPipeline, load_base_components


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FamilyCard:
    """What a model card says about one backbone family: its latent space, generator pipeline, Hub tag and the
    licence of the base model whose blocks, VAE and text encoders the repository holds."""

    name: str
    generator: str
    tag: str
    license: str
    license_name: str | None
    license_link: str
    license_title: str
    scorer: str  # the DiNa-LRM pipeline class of the family and its constructor from a loaded generator
    from_generator: str


SD3_LICENSE_LINK = "https://huggingface.co/stabilityai/stable-diffusion-3.5-medium/blob/main/LICENSE.md"
FAMILY_CARDS = {
    "sd3": FamilyCard(
        "SD3", "StableDiffusion3Pipeline", "stable-diffusion-3", "other", "stabilityai-ai-community",
        SD3_LICENSE_LINK, "Stability AI Community License", "DiNaLRMPipeline", "from_sd3",
    ),
    "flux": FamilyCard(
        "FLUX", "FluxPipeline", "flux", "other", "flux-1-dev-non-commercial-license",
        "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md", "FLUX.1 [dev] Non-Commercial License",
        "DiNaLRMFluxPipeline", "from_flux",
    ),
    "zimage": FamilyCard(
        "Z-Image", "ZImagePipeline", "z-image", "apache-2.0", None,
        "https://huggingface.co/Tongyi-MAI/Z-Image-Turbo", "Apache-2.0 licence",
        "DiNaLRMZImagePipeline", "from_zimage",
    ),
}  # fmt: skip
CITATION = """\
@article{dinalrm2026,
  title   = {Beyond VLM-Based Rewards: Diffusion-Native Latent Reward Modeling},
  journal = {arXiv preprint arXiv:2602.11146},
  year    = {2026},
  url     = {https://arxiv.org/abs/2602.11146}
}"""

CARD_BODY = """\
# DiNa-LRM: a diffusion-native latent reward model

DiNa-LRM ([arXiv 2602.11146](https://arxiv.org/abs/2602.11146)) scores text-to-image samples in {family} latent
space: a clean VAE latent is noised to a level `t`, the first {num_layers} blocks of {base}'s transformer read it
with the prompt, and a small timestep-aware query head returns one reward (higher = preferred). It is cheap (no pixel
decoding, part of one backbone pass) and differentiable with respect to the latents.

## Usage

```python
import torch
from PIL import Image

from pipeline_dinalrm import DiNaLRMPipeline

pipe = DiNaLRMPipeline.from_pretrained("{repo_id}").to("cuda")
generator = torch.Generator().manual_seed(0)
images = [Image.open("a.png"), Image.open("b.png")]
rewards = pipe("a photo of a cat", images=images, generator=generator).rewards
ensemble = pipe("a photo of a cat", images=images, t={ensemble_t}, generator=generator).rewards
comparison = pipe.compare("a photo of a cat", images[0], images[1], generator=generator)
print(comparison.probability, comparison.winner)
```

`DiNaLRMPipeline` comes with the `dinalrm` package ({install}) and loads any DiNa-LRM repository with the
installed code. A repository that ships its own `pipeline_dinalrm.py` also loads without the package, running that
file: `DiffusionPipeline.from_pretrained("{repo_id}", trust_remote_code=True)`.

Score latents from `{generator}(..., output_type="latent")` with `pipe(prompt, latents=latents)`,
or keep the autograd graph for reward fine-tuning with `pipe.reward_fn(latents, prompt_embeds=...,
pooled_prompt_embeds=...)`. From the shell:

```bash
dinalrm score --model {repo_id} --prompt "a photo of a cat" a.png b.png
```

## Noise level and score scale

- Default noise level `t = {default_t}` (snapped to the reward model's sigma table, shift {shift}); the multi-level
  ensemble uses `t = {ensemble_t}` with one noise shared by all levels and one pooled score. For photos read
  from disk the official README uses `t = 0.1`.
- Rewards are raw by default; `normalize=True` gives the official display score `(raw + 10) / 10`. Only
  differences between rewards for the same prompt are meaningful: `P(A preferred) = Phi((r_A - r_B) /
  sqrt(2 (k t^2 + v0)))` with `k = {k}`, `v0 = {v0}` (`pipe.compare`).
- Scoring draws noise: pass a `generator` for reproducible rewards, or `num_noise_samples > 1` to average draws.
  The images of one prompt share their noise draw (`noise_sharing="prompt"`, as the pairs of training did), so
  identical images tie at P = 0.5; `noise_sharing="none"` draws one noise per image, as the reference code does.

## Licence

The DiNa-LRM code is Apache-2.0. The backbone blocks
inside `reward_model/` and the VAE, text encoders, tokenizers and scheduler in this repository come from
{base_link} and are distributed under the
[{license_title}]({license_link}); using this repository means accepting that licence.

## Citation

```bibtex
{citation}
```
"""


# How every card and the documentation say to install the package (one wording, one place).
INSTALL = "not on PyPI yet: `pip install -e .` in a clone of its repository, or `pip install` the wheel built there"

TAGS = ["dinalrm", "reward-model", "text-to-image", "preference-model"]
TASK = {"task_type": "text-to-image", "task_name": "Text-to-image preference prediction"}


def card_data(
    base: str,
    model_name: str,
    library_name: str,
    datasets: Sequence[str] | None = None,
    eval_results: Sequence[EvalResult] | None = None,
    family: str = "sd3",
) -> ModelCardData:
    """The Hub metadata of every DiNa-LRM card: the licence of the base model whose blocks the weights hold (the
    Stability AI Community License for SD3.5, see [`FAMILY_CARDS`] for the other backbone families), `base_model` (a
    Hub id; a local folder is not named), the training `datasets` (Hub ids) and evaluation results in the Hub's
    model-index format."""
    facts = FAMILY_CARDS[family]
    return ModelCardData(
        library_name=library_name,
        license=facts.license,
        license_name=facts.license_name,
        license_link=facts.license_link,
        base_model=None if os.path.isdir(base) else base,
        datasets=[name for name in datasets or () if not os.path.isdir(name)] or None,
        model_name=model_name,
        eval_results=list(eval_results) if eval_results else None,
        tags=[*TAGS, facts.tag],
    )


def pairwise_accuracy_result(accuracy: float, setting: str, dataset: str, split: str | None) -> EvalResult:
    """One pairwise accuracy (a fraction) of a noise `setting` on `dataset` as a model-index entry."""
    return EvalResult(
        **TASK,
        dataset_type=dataset,
        dataset_name=dataset,
        dataset_split=split,
        metric_type="accuracy",
        metric_name=f"Pairwise accuracy ({setting})",
        metric_value=round(float(accuracy), 4),
    )


def eval_results_from_run_eval(results: Mapping[str, Mapping[str, Mapping]]) -> list[EvalResult]:
    """The entries of `eval/run_eval.py`'s `results.json` (`{setting: {benchmark[:split]: entry}}`) with an accuracy,
    each under its benchmark's Hub dataset id."""
    entries = []
    for setting, benchmarks in results.items():
        for key, entry in benchmarks.items():
            name, _, split = key.partition(":")
            spec = BENCHMARKS.get(name)
            if entry.get("accuracy") is None or spec is None or spec.hub_id is None:
                continue
            entries.append(pairwise_accuracy_result(entry["accuracy"], setting, spec.hub_id, split or spec.split))
    return entries


def write_model_card(
    pipe: DiNaLRMPipeline,
    base: str,
    repo_id: str,
    output_dir: str,
    datasets: Sequence[str] | None = None,
    eval_results: Sequence[EvalResult] | None = None,
) -> None:
    """The repository's README.md: Hub metadata (see [`card_data`]) and a usage card."""
    config = pipe.reward_model.config
    facts = FAMILY_CARDS[config.backbone]
    # A local base is named by its folder: the card must not publish a path of the machine that built it.
    base_name = f"the local pipeline `{os.path.basename(os.path.normpath(base))}`" if os.path.isdir(base) else base
    metadata = card_data(base, repo_id, "diffusers", datasets, eval_results, config.backbone)
    body = CARD_BODY.format(
        family=facts.name,
        generator=facts.generator,
        license_title=facts.license_title,
        repo_id=repo_id,
        install=INSTALL,
        base=base_name,
        base_link=base_name if os.path.isdir(base) else f"[{base}](https://huggingface.co/{base})",
        num_layers=config.num_backbone_layers,
        default_t=config.default_t,
        ensemble_t=list(config.ensemble_t),
        shift=config.scheduler_shift,
        k=config.thurstone_k,
        v0=config.thurstone_v0,
        license_link=facts.license_link,
        citation=CITATION,
    )
    ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n{body}").save(os.path.join(output_dir, "README.md"))


def drop_local_paths(pipe) -> None:
    """Keep only the folder name of the local path diffusers records as each loaded model's `_name_or_path`, so
    that a saved repository carries no path of the machine that wrote it (Hub ids stay as they are)."""
    for component in pipe.components.values():
        name = getattr(getattr(component, "config", None), "_name_or_path", None)
        if hasattr(component, "register_to_config") and isinstance(name, str):
            component.register_to_config(_name_or_path=provenance_name(name))


def build_hub_repo(
    reward_model: DiNaLRMModel,
    base: str,
    output_dir: str,
    revision: str | None = None,
    repo_id: str | None = None,
    datasets: Sequence[str] | None = None,
    eval_results: Sequence[EvalResult] | None = None,
) -> DiNaLRMPipeline:
    """Save `reward_model` with `base`'s components as a pipeline repository in `output_dir`, with a model card
    naming the training `datasets` and carrying `eval_results`. `base` is a pipeline of the reward model's backbone
    family (SD3, FLUX or Z-Image); the repository's pipeline class follows that family.

    `output_dir` must be empty or missing: the caller decides whether to replace what is there.
    """
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        raise ValueError(f"{output_dir} is not empty; refusing to write the Hub repository over it.")
    pipeline_class = DiNaLRMPipeline._class_for(reward_model)
    components = load_base_components(
        base,
        revision=revision,
        names=pipeline_class._base_components,
        optional=pipeline_class._optional_components,
    )
    pipe = pipeline_class(reward_model=reward_model, **components)
    drop_local_paths(pipe)
    pipe.save_pretrained(output_dir)
    name = repo_id or os.path.basename(os.path.abspath(output_dir))
    write_model_card(pipe, base, name, output_dir, datasets, eval_results)
    return pipe


def check_output_dir(output_dir: str | os.PathLike, inputs: Sequence[str | os.PathLike], overwrite: bool) -> None:
    """Refuses (`SystemExit` naming the problem and the fix) a converter's `--output_dir` that would lose files: a
    file, a folder that is, holds or sits inside one of the local `inputs` (paths resolved, links followed), or a
    non-empty folder without `overwrite`."""
    output_dir = os.fspath(output_dir)
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise SystemExit(f"--output_dir {output_dir} is a file, not a folder: choose a folder.")
    target = os.path.realpath(output_dir)
    for source in inputs:
        if not os.path.exists(source):  # a Hub id
            continue
        resolved = os.path.realpath(source)
        if os.path.commonpath([target, resolved]) in (target, resolved):
            raise SystemExit(
                f"--output_dir {output_dir} overlaps the input {source}: writing there would replace the files being "
                "converted. Choose another folder."
            )
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise SystemExit(f"{output_dir} is not empty; pass --overwrite to replace its files.")


def build_hub_folder(
    reward_model: str,
    base: str,
    output_dir: str,
    revision: str | None = None,
    datasets: Sequence[str] | None = None,
    eval_results: str | None = None,
    overwrite: bool = False,
    push_to: str | None = None,
    private: bool = False,
) -> DiNaLRMPipeline:
    """`dinalrm build-hub`: [`build_hub_repo`] from the saved reward model folder `reward_model`, with the
    accuracies of `dinalrm eval`'s `results.json` (path `eval_results`) in the card, then pushed to the Hub
    repository `push_to` when given. A non-empty `output_dir` is replaced only with `overwrite` (else SystemExit)."""
    check_output_dir(output_dir, [reward_model, base], overwrite)
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        shutil.rmtree(output_dir)
    model = DiNaLRMModel.from_pretrained(reward_model)
    results = None
    if eval_results:
        with open(eval_results, encoding="utf-8") as handle:
            results = eval_results_from_run_eval(json.load(handle))
    pipe = build_hub_repo(model, base, output_dir, revision, push_to, datasets, results)
    logger.info("Wrote the Hub repository to %s.", output_dir)
    if push_to:
        repo_id = create_repo(push_to, exist_ok=True, private=private).repo_id
        upload_folder(repo_id=repo_id, folder_path=output_dir, commit_message="Upload DiNa-LRM pipeline")
        logger.info("Pushed to https://huggingface.co/%s.", repo_id)
    return pipe
