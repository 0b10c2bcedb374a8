"""The Space in a real browser: Debian's headless Chromium, driven by Playwright, against the app served in-process.

Chromium comes from Debian (`.ci/run` installs `chromium`; Playwright's own browser download is never used). On a
machine without it these tests skip, naming the missing browser; CI sets `DINALRM_REQUIRE_BROWSER=1`, which turns
that skip into a failure so the browser tests always run there.
"""

import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import tolerances
import torch
from conftest import free_port, load_space_app
from PIL import Image
from playwright.sync_api import Browser, Page, sync_playwright

from dinalrm.testing import save_tiny_dinalrm_repo, torch_threads


REPO_ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO_ROOT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
REQUIRE_BROWSER = "DINALRM_REQUIRE_BROWSER"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PROMPT = "a photo of a red apple on a wooden table"
TIMEOUT_MS = 60_000
# A browser and the served app for the module: end to end, outside the quick tier (tests/test_space.py checks the
# app's behaviours without a browser).
pytestmark = pytest.mark.slow
# True once the toast holding the text is fully opaque (its fade-in transition animates an ancestor's opacity).
FADED_IN = """text => {
    const toast = [...document.querySelectorAll('.toast-body')].find(node => node.innerText.includes(text));
    for (let node = toast; node; node = node.parentElement) {
        if (getComputedStyle(node).opacity !== '1') return false;
    }
    return Boolean(toast);
}"""
# True once the file box lists every name (it renders each name's stem and extension in separate elements).
LISTED = """names => {
    const listed = document.querySelector('#rank_images').innerText.replace(/\\s/g, '');
    return names.every(name => listed.includes(name));
}"""


app = load_space_app()


class OutboundCalls:
    """Hosts this process resolves or connects to while `recording` (audit hooks cannot be removed, so it is gated)."""

    def __init__(self) -> None:
        self.recording = False
        self.hosts: set[str] = set()

    def __call__(self, event: str, args: tuple) -> None:
        if not self.recording:
            return
        if event == "socket.getaddrinfo":
            self.hosts.add(str(args[0]))
        elif event == "socket.connect" and isinstance(args[1], tuple):
            self.hosts.add(str(args[1][0]))


OUTBOUND = OutboundCalls()
sys.addaudithook(OUTBOUND)
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Files on the user's disk: three small pictures and a corrupt `.png`."""
    folder = tmp_path_factory.mktemp("user-files")
    paths = {}
    for seed, name in enumerate(("a.png", "b.png", "c.png")):
        coarse = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
        paths[name] = folder / name
        Image.fromarray(coarse).resize((64, 64), Image.Resampling.BICUBIC).save(paths[name])
    paths["corrupt.png"] = folder / "corrupt.png"
    paths["corrupt.png"].write_bytes(b"\x89PNG but then nothing an image decoder can use" * 20)
    return paths


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    """The app on 127.0.0.1 with a tiny local model and its own upload folder; yields its URL."""
    repo = save_tiny_dinalrm_repo(tmp_path_factory.mktemp("dinalrm-tiny") / "repo")
    settings = app.ModelSettings(name=repo, device="cpu", dtype=torch.float32, explicit=True)
    with pytest.MonkeyPatch.context() as patch, torch_threads(1):
        patch.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio-uploads")))
        patch.setattr(app, "MODEL", app.SharedModel(settings))
        OUTBOUND.recording = True
        app.MODEL.load()
        demo = app.build_demo().queue()
        port = free_port()
        demo.launch(
            server_name="127.0.0.1",
            server_port=port,
            prevent_thread_lock=True,
            ssr_mode=False,
            quiet=True,
            **app.launch_options(),
        )
        try:
            yield f"http://127.0.0.1:{port}/"
        finally:
            OUTBOUND.recording = False
            demo.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.is_file():
        reason = f"{CHROMIUM} is missing: install Debian's chromium (`apt-get install chromium`, as .ci/run does)."
        if os.environ.get(REQUIRE_BROWSER) == "1":
            pytest.fail(f"{reason} ({REQUIRE_BROWSER}=1 requires the browser tests to run)", pytrace=False)
        pytest.skip(reason)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture()
def page(browser, server) -> Iterator[Page]:
    """A fresh page on the app; every host it contacts is collected in `page.hosts`."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.hosts = set()
    page.on("request", lambda request: page.hosts.add(urlsplit(request.url).hostname))
    page.goto(server)
    page.locator("#model_status").get_by_text("Model:").wait_for()
    yield page
    context.close()


def upload(page: Page, elem_id: str, path: Path) -> None:
    """Uploads a file into an image box and waits until the box shows that file."""
    page.locator(f"#{elem_id} input[type=file]").set_input_files(str(path))
    page.wait_for_function(
        "([id, name]) => document.querySelector(`#${id} img`)?.src.includes(name)", arg=[elem_id, path.name]
    )


def error_toast(page: Page, text: str) -> str:
    """The text of the error toast containing `text`, once it has finished fading in."""
    toast = page.locator(".toast-body").filter(has_text=text)
    toast.wait_for()
    page.wait_for_function(FADED_IN, arg=text)
    return toast.inner_text()


def test_compare_shows_the_winner_and_probability_then_refuses_a_corrupt_file(page, inputs):
    page.locator("#prompt textarea").fill(PROMPT)
    upload(page, "image_a", inputs["a.png"])
    upload(page, "image_b", inputs["b.png"])
    page.locator("#compare").click()
    verdict = page.locator("#verdict .verdict")
    verdict.wait_for()
    text = verdict.inner_text()
    shown_winner, shown_probability = verdict.get_attribute("data-winner"), verdict.get_attribute("data-probability")
    rewards = page.locator("#rewards").inner_text()
    for plot in ("#reward_curve", "#probability_curve"):
        page.wait_for_function(
            "plot => document.querySelector(`${plot} .vega-embed svg`)?.textContent.includes('noise level t')",
            arg=plot,
        )
    legend = page.locator("#reward_curve .vega-embed svg text").evaluate_all("texts => texts.map(t => t.textContent)")
    assert {"A", "B"} <= set(legend)

    # Computed once the page's own work (verdict, then the curves) is done, so the two never share the model.
    expected = app.compare_images(
        app.MODEL.get(), PROMPT, Image.open(inputs["a.png"]), Image.open(inputs["b.png"]), app.ScoreOptions()
    )
    assert re.search(r"Image ([AB]) is preferred", text).group(1) == expected.winner
    assert re.search(r"P\(A preferred\) = ([0-9.]+)", text).group(1) == f"{expected.probability:.3f}"
    assert shown_winner == expected.winner
    assert float(shown_probability) == tolerances.close_to(expected.probability, scale=1.0)
    assert f"{expected.reward_a:.4f}".rstrip("0") in rewards and f"{expected.reward_b:.4f}".rstrip("0") in rewards
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "space-compare.png", full_page=True, animations="disabled")

    upload(page, "image_a", inputs["corrupt.png"])
    page.locator("#compare").click()
    message = error_toast(page, "could not be read as an image")
    assert "Image A (corrupt.png) could not be read as an image: the file is corrupt or not an image." in message
    page.screenshot(path=ARTIFACTS / "space-corrupt-file.png", full_page=True, animations="disabled")
    assert page.hosts == {"127.0.0.1"}
    assert "127.0.0.1" in OUTBOUND.hosts and OUTBOUND.hosts <= LOOPBACK, f"the app contacted {OUTBOUND.hosts}"


def test_rank_orders_the_gallery_best_first(page, inputs):
    page.get_by_role("tab", name="Rank").click()
    page.locator("#rank_prompt textarea").fill(PROMPT)
    names = ["a.png", "b.png", "c.png"]
    page.locator("#rank_images input[type=file]").set_input_files([str(inputs[name]) for name in names])
    page.wait_for_function(LISTED, arg=names)
    page.locator("#rank").click()
    page.locator("#rank_gallery img").nth(len(names) - 1).wait_for()

    ranking = app.rank_images(
        app.MODEL.get(), PROMPT, [Image.open(inputs[name]) for name in names], app.ScoreOptions()
    )
    table = page.locator("#rank_table").inner_text()
    shown = re.findall(r"[abc]\.png", table)
    assert shown == [names[index] for index, _ in ranking]
    assert page.hosts == {"127.0.0.1"}
    assert OUTBOUND.hosts <= LOOPBACK, f"the app contacted {OUTBOUND.hosts - LOOPBACK}"


def test_an_example_fills_the_inputs_and_compares(page):
    page.locator("#compare_examples").get_by_role("row").nth(1).click()
    page.wait_for_function("() => document.querySelector('#image_b img')?.src.includes('apple_degraded')")
    assert page.locator("#prompt textarea").input_value() == PROMPT
    page.locator("#compare").click()
    assert "is preferred" in page.locator("#verdict .verdict").inner_text()
