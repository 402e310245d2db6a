"""End to end in a real browser: Debian's headless Chromium driven by Playwright against `meddiff serve` on a free
localhost port. `bash scripts/install.sh test` installs both; screenshots go to test-artifacts/ (or
$MEDDIFF_ARTIFACTS)."""

import csv
import io
import os
import shutil
import socket
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

playwright_api = pytest.importorskip("playwright.sync_api", reason="needs playwright: bash scripts/install.sh test")

from meddiff.serve.app import launch  # noqa: E402
from meddiff.serve.service import ModelService, ServeLimits, VolumeModelService  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("MEDDIFF_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
TIMEOUT_MS = 120_000

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium: bash scripts/install.sh test")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(run_dir, **limits):
    service = ModelService(run_dir, ServeLimits(**{"max_images": 4, "max_steps": 10, "max_prompt_chars": 60, **limits}))
    demo, url = launch(service, port=_free_port(), block=False)
    return service, demo, url


@pytest.fixture(scope="module")
def labels_server(tiny_run):
    service, demo, url = _serve(tiny_run)
    yield service, url
    demo.close()
    service.close()


@pytest.fixture(scope="module")
def text_server(text_run):
    service, demo, url = _serve(text_run)
    yield service, url
    demo.close()
    service.close()


@pytest.fixture(scope="module")
def volume_server(volume_run):
    service = VolumeModelService(volume_run, ServeLimits(max_steps=10))
    demo, url = launch(service, port=_free_port(), block=False)
    yield service, url
    demo.close()
    service.close()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def _open(browser, url):
    page = browser.new_page(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url, wait_until="networkidle")
    # gradio renders the page after the network goes quiet: wait for the button before asserting what is shown
    playwright_api.expect(page.get_by_role("button", name="Generate")).to_be_visible(timeout=TIMEOUT_MS)
    return page


def _set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Enter")


def _wait_status(page, text: str) -> str:
    page.wait_for_function("t => (document.querySelector('#status')?.innerText || '').includes(t)", arg=text)
    return page.locator("#status").inner_text()


def _gallery_images(page, n: int) -> list[np.ndarray]:
    page.wait_for_function("n => document.querySelectorAll('#gallery img').length >= n", arg=n)
    sources = page.locator("#gallery img").evaluate_all("imgs => imgs.map(i => i.src)")
    images = []
    for src in sources:
        response = page.request.get(src)
        assert response.ok, src
        images.append(np.asarray(Image.open(io.BytesIO(response.body())).convert("L"), np.float32) / 255)
    return images


def _download_manifest(page) -> tuple[list[dict], set[str]]:
    with page.expect_download() as info:
        page.locator("#download").click()
    path = info.value.path()
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        rows = list(csv.DictReader(io.StringIO(zf.read("manifest.csv").decode())))
    return rows, names


def _screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def test_pick_findings_generate_and_download(labels_server, browser):
    service, url = labels_server
    assert url.startswith("http://127.0.0.1:")  # localhost unless told otherwise
    page = _open(browser, url)
    assert "not for diagnosis" in page.locator("#synthetic-notice").first.inner_text()
    assert "Cardiomegaly" in page.locator("#model-summary").inner_text()
    # a label model shows findings, not a prompt box
    playwright_api.expect(page.get_by_label("Cardiomegaly")).to_be_visible()
    playwright_api.expect(page.locator("#prompt")).to_be_hidden()
    page.get_by_label("Cardiomegaly").check()
    page.get_by_label("Edema").check()
    _set_number(page, "n-images", 3)
    _set_number(page, "steps", 3)
    page.get_by_role("button", name="Generate").click()
    assert "3 synthetic images" in _wait_status(page, "synthetic images")
    images = _gallery_images(page, 3)
    assert len(images) == 3 and all(float(im.std()) > 0.02 for im in images)  # not blank
    assert page.locator("#gallery").inner_text().count("Cardiomegaly+Edema") == 3
    _screenshot(page, "serve-labels.png")
    rows, names = _download_manifest(page)
    assert len(rows) == 3 and {f"images/{i:07d}.png" for i in range(3)} <= names
    assert {(r["Cardiomegaly"], r["Edema"], r["Pleural Effusion"], r["steps"]) for r in rows} == {
        ("1.0", "1.0", "0.0", "3")
    }
    page.close()


def test_type_a_prompt_and_bad_input_shows_messages(text_server, browser):
    service, url = text_server
    page = _open(browser, url)
    prompt = page.locator("#prompt textarea")
    playwright_api.expect(prompt).to_be_visible(timeout=TIMEOUT_MS)
    page.get_by_role("button", name="Generate").click()  # empty prompt
    assert "type a prompt" in _wait_status(page, "Not generated")
    prompt.fill("chest x-ray with cardiomegaly " * 3)  # 90 characters, limit 60
    page.get_by_role("button", name="Generate").click()
    assert "the limit is 60" in _wait_status(page, "the limit is")
    prompt.fill("chest x-ray with pleural effusion")
    page.locator("#seed input").fill("-3")
    page.get_by_role("button", name="Generate").click()
    assert "Seed must be a whole number" in _wait_status(page, "Seed must")
    _screenshot(page, "serve-bad-input.png")
    page.locator("#seed input").fill("42")
    _set_number(page, "n-images", 2)
    _set_number(page, "steps", 2)
    page.get_by_role("button", name="Generate").click()
    _wait_status(page, "2 synthetic images")
    assert len(_gallery_images(page, 2)) == 2
    rows, _ = _download_manifest(page)
    assert [r["prompt"] for r in rows] == ["chest x-ray with pleural effusion"] * 2
    _screenshot(page, "serve-prompt.png")
    page.close()


def test_several_browsers_at_once_are_queued(labels_server, browser):
    service, url = labels_server
    pages = [_open(browser, url) for _ in range(3)]
    for k, page in enumerate(pages):
        _set_number(page, "n-images", 1 + k)
        _set_number(page, "steps", 2)
    for page in pages:  # click all before waiting: the server queues them
        page.get_by_role("button", name="Generate").click()
    for k, page in enumerate(pages):
        assert f"{1 + k} synthetic image" in _wait_status(page, "synthetic image")
        assert len(_gallery_images(page, 1 + k)) == 1 + k
    for page in pages:
        page.close()
    assert threading.active_count() < 200  # no thread leak from the queue


def test_requests_the_page_cannot_make_are_refused_by_the_server(labels_server):
    """A script posting to the page's API (not the page itself) with an unknown finding or out-of-range steps gets an
    error message, and the server goes on serving."""
    from gradio_client import Client

    service, url = labels_server
    client = Client(url, verbose=False)
    base = ["", "", ["Cardiomegaly"], "absent", 1, 2, 2.0, "dpm++", 0]
    for bad in ({2: ["Dragon scales"]}, {5: 500}, {7: "../../etc/passwd"}):
        args = [bad.get(i, v) for i, v in enumerate(base)]
        with pytest.raises(Exception, match="not in the list of choices|greater than maximum|scheduler"):
            client.predict(*args, api_name="/generate")
    gallery, download, status = client.predict(*base, api_name="/generate")
    assert "1 synthetic image in" in status and len(gallery) == 1


def test_volume_page_pick_labels_slide_through_slices_and_download_the_nifti(volume_server, browser, tmp_path):
    """A volume model's page: labels as checkboxes, one volume, a working slice slider in each plane (the sliders
    live in a sandboxed iframe, where their script runs), and the NIfTI download on the training grid."""
    import nibabel as nib

    service, url = volume_server
    page = _open(browser, url)
    assert "not for diagnosis" in page.locator("#synthetic-notice").first.inner_text()
    assert "16 × 16 × 16 voxels" in page.locator("#model-summary").inner_text()
    page.get_by_label("Tumour", exact=True).check()
    _set_number(page, "steps", 2)
    page.locator("#seed input").fill("-1")
    page.get_by_role("button", name="Generate").click()
    assert "Seed must be a whole number" in _wait_status(page, "Not generated")
    page.locator("#seed input").fill("4")
    page.get_by_role("button", name="Generate").click()
    assert "1 synthetic volume (Tumour)" in _wait_status(page, "synthetic volume")
    viewer = page.frame_locator("#volume-viewer iframe")
    assert viewer.locator("figure").count() == 3
    for k, plane in enumerate(("axial", "coronal", "sagittal")):
        figure = viewer.locator("figure").nth(k)
        assert f"({plane}, 9 / 16)" in figure.locator("figcaption").inner_text()
        before = figure.locator("img").get_attribute("src")
        figure.locator("input[type=range]").fill("2")
        page.wait_for_timeout(200)
        assert f"({plane}, 3 / 16)" in figure.locator("figcaption").inner_text()
        assert figure.locator("img").get_attribute("src") != before  # the slider shows another slice
    _screenshot(page, "serve-volume.png")
    with page.expect_download() as info:
        page.locator("#download-nifti").click()
    assert info.value.suggested_filename.endswith(".nii.gz")
    info.value.save_as(tmp_path / info.value.suggested_filename)
    image = nib.load(tmp_path / info.value.suggested_filename)
    assert image.shape == (16, 16, 16)
    np.testing.assert_allclose(image.affine, np.asarray(service.grid.affine))
    page.close()
