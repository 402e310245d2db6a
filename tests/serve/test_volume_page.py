"""The web page for a 3D volume model: labels offered, one volume generated with a slice slider per plane, its
NIfTI on the training grid, bad requests refused with a message, and `meddiff serve` picking this page."""

import csv
import html
import io
import re
import zipfile

import nibabel as nib
import numpy as np
import pytest

from meddiff.errors import MeddiffError
from meddiff.serve.app import build_app, respond_volume
from meddiff.serve.service import RequestError, ServeLimits, VolumeModelService, VolumeRequest

pytest.importorskip("gradio", reason="the web page needs gradio: pip install 'meddiff[serve]'")


@pytest.fixture(scope="module")
def service(volume_run, tmp_path_factory):
    service = VolumeModelService(
        volume_run, ServeLimits(max_steps=10, max_guidance=5, keep_results=2), work_dir=tmp_path_factory.mktemp("vw")
    )
    yield service
    service.close()


@pytest.fixture(scope="module")
def tumour(service):
    """One generated volume with the tumour label (2 steps, seed 3)."""
    steps = []
    response = respond_volume(
        service,
        VolumeRequest(labels=["tumour"], steps=2, guidance=2.0, seed=3),
        on_step=lambda done, total: steps.append((done, total)),
    )
    return response, steps


def _viewer_document(viewer: str) -> str:
    match = re.search(r'srcdoc="([^"]*)"', viewer)
    assert match, viewer[:200]
    return html.unescape(match.group(1))


def test_the_page_offers_the_labels_and_shows_the_grid(service):
    assert service.label_names == ["Tumour"]  # "Tumour volume mL" is a measurement, not a 0/1 condition
    summary = service.summary()
    assert "16 × 16 × 16 voxels at 13 × 13 × 13 mm" in summary
    assert "not for diagnosis" in (service.model_card() or "").lower()
    config = build_app(service).config
    by_id = {c["props"].get("elem_id"): c for c in config["components"] if c.get("props", {}).get("elem_id")}
    choices = [value for _, value in by_id["labels"]["props"]["choices"]]
    assert choices == ["Tumour"] and by_id["labels"]["type"] == "checkboxgroup"
    assert by_id["steps"]["props"]["maximum"] == 10 and by_id["guidance"]["props"]["maximum"] == 5
    assert {"volume-viewer", "download-nifti", "download", "seed", "others"} <= set(by_id)
    assert "prompt" not in by_id and "scheduler" not in by_id  # volume models take labels only


def test_generate_shows_three_slice_sliders_and_a_nifti_on_the_training_grid(service, tumour):
    response, steps = tumour
    assert response.ok and "1 synthetic volume (Tumour)" in response.message
    assert steps == [(1, 2), (2, 2)]
    assert "sandbox='allow-scripts'" in response.viewer
    document = _viewer_document(response.viewer)
    assert document.count("<input type='range' min='0' max='15'") == 3
    for plane in ("axial", "coronal", "sagittal"):
        assert f"({plane}, <span class='slice'>9</span> / 16)" in document  # starts at the middle slice
    assert len(set(re.findall(r"<figure id='([^']+)'>", document))) == 3  # one slider each
    assert document.count("data:image/png;base64,") >= 3 * 16
    image = nib.load(response.nifti)
    grid = service.grid
    assert response.nifti.name.endswith(".nii.gz") and response.nifti.parent == service.work
    assert image.shape == tuple(grid.shape) == (16, 16, 16)
    np.testing.assert_allclose(image.affine, np.asarray(grid.affine))
    assert b"SYNTHETIC" in image.header["descrip"].tobytes()
    data = np.asarray(image.dataobj, np.float32)
    assert 0 <= data.min() and data.max() <= 1 and float(data.std()) > 0
    with zipfile.ZipFile(response.zip_path) as zf:
        names = set(zf.namelist())
        rows = list(csv.DictReader(io.StringIO(zf.read("manifest.csv").decode())))
        assert "not for diagnosis" in zf.read("README.txt").decode()
    assert {"volumes/0000000.nii.gz", "manifest.csv", "README.txt"} <= names
    assert len(rows) == 1 and rows[0]["Tumour"] == "1" and "Tumour volume mL" not in rows[0]
    assert (rows[0]["steps"], rows[0]["guidance"]) == ("2", "2.0")


def test_the_page_draws_what_meddiff_generate_draws(volume_run, tumour, tmp_path):
    from meddiff.cli import main

    response, _ = tumour
    args = ["--labels", "Tumour", "--n", "1", "--seed", "3", "--steps", "2", "--guidance", "2.0"]
    assert main(["-q", "generate", "--model", str(volume_run), *args, "--out", str(tmp_path)]) == 0
    cli = nib.load(tmp_path / "volumes" / "0000000.nii.gz")
    page = nib.load(response.nifti)
    np.testing.assert_array_equal(np.asarray(cli.dataobj), np.asarray(page.dataobj))
    np.testing.assert_array_equal(cli.affine, page.affine)


def test_viewer_has_a_row_of_three_sliders_per_channel(tmp_path):
    """Several channels (modalities): one row each, every slider with its own id; anisotropic grids keep their
    proportions (the frame is tall enough for the tallest slice)."""
    from meddiff.serve.app import volume_viewer_html
    from meddiff.serve.service import VolumeResult

    volume = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 8)).astype(np.float32)
    volume[1] = 0  # a constant channel: its three planes look alike, their sliders must not share an id
    result = VolumeResult(volume, "Tumour", ["flair", "t1c"], [1.0, 1.0, 4.0], [], tmp_path, tmp_path, 0.0)
    viewer = volume_viewer_html(result)
    document = _viewer_document(viewer)
    assert document.count("<input type='range'") == 6 and "<h4>flair</h4>" in document and "<h4>t1c</h4>" in document
    assert len(set(re.findall(r"<figure id='([^']+)'>", document))) == 6
    assert "max='7'" in document and "max='15'" in document  # 8 axial slices, 16 coronal and sagittal
    height = int(re.search(r"height:(\d+)px", viewer).group(1))
    assert height >= 2 * 480  # coronal/sagittal slices of 8 x 4 mm over 16 x 1 mm: twice as tall as wide


def _r(**kw):
    return VolumeRequest(**{"labels": ["Tumour"], "steps": 2, **kw})


@pytest.mark.parametrize(
    "request_, message",
    [
        (_r(labels=["Tumour", "Dragon scales"]), "unknown label 'Dragon scales'; this model knows: Tumour"),
        (_r(steps=11), "Steps must be a whole number from 1 to 10, got 11"),
        (_r(steps=None), "Steps is missing"),
        (_r(guidance=6), "Guidance scale must be from 0 to 5"),
        (_r(guidance="lots"), "Guidance scale"),
        (_r(seed=-1), "Seed must be a whole number"),
        (_r(others="maybe"), "absent or unspecified"),
    ],
)
def test_bad_requests_are_refused_with_a_message(service, request_, message):
    with pytest.raises(RequestError, match=re.escape(message)):
        service.check(request_)


def test_a_refused_request_is_a_one_line_message_and_writes_nothing(service):
    before = sorted(service.work.iterdir())
    response = respond_volume(service, _r(labels=["Dragon scales"], steps=500))
    assert not response.ok and response.nifti is None and response.viewer == ""
    assert response.message.startswith("**Not generated:**") and "\n" not in response.message
    assert sorted(service.work.iterdir()) == before


def test_label_choices_mean_what_generate_means(service):
    labels, known, *_ = service.check(_r(labels=["Tumour"]))
    assert labels.tolist() == [[1.0]] and known.all()
    labels, known, *_ = service.check(_r(labels=["Tumour"], others="unspecified"))
    assert labels.tolist() == [[1.0]] and known.tolist() == [[True]]
    labels, known, *_ = service.check(_r(labels=[]))
    assert labels.sum() == 0 and known.all()  # nothing checked: none of the labels
    _, known, *_ = service.check(_r(labels=[], others="unspecified"))
    assert not known.any()  # unconditional


def test_same_seed_same_volume_and_old_results_are_pruned(service):
    a = service.generate(_r(steps=1, seed=9))
    b = service.generate(_r(steps=1, seed=9))
    c = service.generate(_r(steps=1, seed=10))
    np.testing.assert_array_equal(a.volume, b.volume)
    assert not np.array_equal(a.volume, c.volume) and a.volume.shape == (1, 16, 16, 16)
    assert len(list(service.work.glob("*.zip"))) == 2 and len(list(service.work.glob("*.nii.gz"))) == 2  # keep 2
    assert len([p for p in service.work.iterdir() if p.is_dir()]) == 2


def test_missing_volume_model_is_one_line(tmp_path):
    with pytest.raises(MeddiffError, match="does not exist"):
        VolumeModelService(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MeddiffError, match="volume_pipeline.json is missing"):
        VolumeModelService(tmp_path / "empty")


def test_serve_cli_opens_the_volume_page_for_a_volume_run(volume_run, monkeypatch):
    from meddiff.cli import main
    from meddiff.serve import app

    opened = []
    monkeypatch.setattr(app, "launch", lambda service, *a, **k: opened.append(service))
    assert main(["serve", "--model", str(volume_run), "--max-steps", "7"]) == 0
    assert len(opened) == 1 and isinstance(opened[0], VolumeModelService)
    assert opened[0].limits.max_steps == 7 and not opened[0].work.exists()  # closed after the page stops
    assert main(["serve", "--model", str(volume_run / "pipeline")]) == 0
    assert isinstance(opened[1], VolumeModelService)


@pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated")  # gradio's queue, pandas 3
def test_the_running_page_answers_bad_api_requests_with_their_message(service):
    """The page's HTTP API (gradio: POST /gradio_api/call/generate, then the event stream): values the page cannot
    send (an unknown label, steps above the limit) and values the service refuses (a negative seed) come back as
    one-line messages, and the server goes on serving."""
    import json
    import socket
    import urllib.request

    from meddiff.serve.app import launch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo, url = launch(service, port=port, block=False)

    def call(labels, steps, seed=0) -> str:
        body = json.dumps({"data": [labels, "absent", steps, 2.0, seed]}).encode()
        post = urllib.request.Request(
            f"{url}gradio_api/call/generate", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(post, timeout=60) as r:
            event = json.loads(r.read())["event_id"]
        with urllib.request.urlopen(f"{url}gradio_api/call/generate/{event}", timeout=120) as r:
            return r.read().decode()

    try:
        unknown = call(["Dragon scales"], 2)
        assert "event: error" in unknown and "'Dragon scales'" in unknown and "not in the list of choices" in unknown
        too_many = call(["Tumour"], 500)
        assert "event: error" in too_many and "greater than maximum value 10" in too_many
        refused = call(["Tumour"], 2, seed=-1)
        assert "event: complete" in refused and "Not generated:** Seed must be a whole number" in refused
        done = call(["Tumour"], 2)
        assert "event: complete" in done and "1 synthetic volume (Tumour)" in done and "srcdoc" in done
    finally:
        demo.close()
