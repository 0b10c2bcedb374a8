"""The scorer worker: runs inside a scorer's own virtual environment and answers the runner over JSON lines.

Standard library only (the environment holds the scorer's package, not dinalrm). Started as
`python isolated_worker.py --backend NAME [--device DEVICE] [--options JSON]`, it loads the backend, writes one
line `{"ready": true, "package": ..., "version": ...}` (or `{"error": ..., "type": ...}` and exits 1), then
answers each request line `{"id": N, "prompts": [...], "paths": [...]}` with `{"id": N, "scores": [...]}` (one
float per path) or `{"id": N, "error": ..., "type": ...}`, until its stdin closes. Everything the package
prints goes to stderr, so stdout carries the protocol only.

Backends: `hpsv2` (`hpsv2.score(paths, prompt, hps_version=...)`), `imagereward` (`ImageReward.load(name,
device=...).score(prompt, paths)`), `hpsv3` (`HPSv3RewardInferencer(device=...).reward(prompts=...,
image_paths=...)`, the mean of each `(mu, sigma)` row) or `module:function`, a factory `function(device,
options)` returning `score(prompts, paths)`.
"""

import argparse
import contextlib
import importlib
import importlib.metadata
import json
import os
import sys
import traceback


def _by_prompt(prompts, paths, score_group):
    """Scores in input order from `score_group(prompt, paths)`, called once per distinct prompt."""
    groups = {}
    for index, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(index)
    scores = [None] * len(paths)
    for prompt, members in groups.items():
        values = score_group(prompt, [paths[i] for i in members])
        values = values if isinstance(values, (list, tuple)) else [values]
        for index, value in zip(members, values):
            scores[index] = value
    return scores


def _no_grad():
    """`torch.inference_mode()` when the environment has torch (all real backends do), else nothing."""
    try:
        import torch
    except ImportError:
        return contextlib.nullcontext()
    return torch.inference_mode()


def load_hpsv2(device, options):
    import hpsv2

    version = options.get("hps_version", "v2.1")
    return "hpsv2", lambda prompts, paths: _by_prompt(
        prompts, paths, lambda prompt, group: hpsv2.score(group, prompt, hps_version=version)
    )


def load_imagereward(device, options):
    import ImageReward

    model = ImageReward.load(options.get("model", "ImageReward-v1.0"), device=device)
    return "image-reward", lambda prompts, paths: _by_prompt(prompts, paths, model.score)


def load_hpsv3(device, options):
    from hpsv3 import HPSv3RewardInferencer

    inferencer = HPSv3RewardInferencer(device=device)

    def score(prompts, paths):
        with _no_grad():
            rewards = inferencer.reward(prompts=list(prompts), image_paths=list(paths))
        return [row[0] for row in rewards]  # each row is (mu, sigma): the score is the mean

    return "hpsv3", score


BACKENDS = {"hpsv2": load_hpsv2, "imagereward": load_imagereward, "hpsv3": load_hpsv3}


def load(backend, device, options):
    """`(distribution name, score function)` of a named backend or a `module:function` factory."""
    if backend in BACKENDS:
        return BACKENDS[backend](device, options)
    module, _, function = backend.partition(":")
    if not function:
        raise ValueError(f"Unknown backend {backend!r}: use one of {sorted(BACKENDS)} or module:function.")
    factory = getattr(importlib.import_module(module), function)
    return module.split(".")[0], factory(device, options)


def _version(distribution):
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _error(err, request_id=None):
    message = {
        "error": f"{type(err).__name__}: {err}",
        "type": type(err).__name__,
        "traceback": traceback.format_exc(),
    }
    return message if request_id is None else {"id": request_id, **message}


def main():
    parser = argparse.ArgumentParser(description="Scorer worker speaking JSON lines on stdin/stdout.")
    parser.add_argument("--backend", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--options", default="{}", help="JSON object passed to the backend.")
    args = parser.parse_args()
    # The protocol keeps the original stdout; the package's prints (Python or C) go to stderr.
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    def send(message):
        protocol.write(json.dumps(message) + "\n")
        protocol.flush()

    try:
        distribution, score = load(args.backend, args.device, json.loads(args.options))
    except BaseException as err:  # noqa: B036 - any failure, even SystemExit from a package, goes back as JSON
        send(_error(err))
        return 1
    send({"ready": True, "package": distribution, "version": _version(distribution)})
    for line in sys.stdin:
        if not line.strip():
            continue
        request_id = None
        try:
            request = json.loads(line)
            request_id = request.get("id")
            prompts, paths = request["prompts"], request["paths"]
            if len(prompts) != len(paths):
                raise ValueError(f"{len(prompts)} prompts for {len(paths)} paths.")
            send({"id": request_id, "scores": [float(value) for value in score(prompts, paths)]})
        except Exception as err:
            send(_error(err, request_id))
    return 0


if __name__ == "__main__":
    sys.exit(main())
