"""The page's rules without a browser: request checks, generation, the ZIP and its manifest, file names."""

import csv
import io
import zipfile

import numpy as np
import pytest

from meddiff.errors import MeddiffError
from meddiff.serve.service import ModelService, Request, RequestError, ServeLimits


@pytest.fixture(scope="module")
def labels_service(tiny_run, tmp_path_factory):
    service = ModelService(
        tiny_run,
        ServeLimits(max_images=4, max_steps=10, max_prompt_chars=40, keep_results=2),
        work_dir=tmp_path_factory.mktemp("serve_work"),
    )
    yield service
    service.close()


@pytest.fixture(scope="module")
def text_service(text_run):
    service = ModelService(text_run, ServeLimits(max_images=4, max_steps=10, max_prompt_chars=40))
    yield service
    service.close()


def test_label_model_request_becomes_the_plan(labels_service):
    assert labels_service.takes_labels and not labels_service.takes_prompts
    plan, settings = labels_service.check(Request(findings=["cardiomegaly"], n=3, steps=5, guidance=1.5, seed=7))
    k = labels_service.label_names.index("Cardiomegaly")
    assert len(plan) == 3 and plan.labels[:, k].eq(1).all() and plan.labels.sum() == 3
    assert plan.known.all()  # "absent": every other finding known absent
    plan, _ = labels_service.check(Request(findings=["Cardiomegaly"], others="unspecified", n=1, steps=2))
    assert plan.known[0].sum() == 1 and plan.known[0, k]
    plan, _ = labels_service.check(Request(findings=[], others="absent", n=1, steps=2))
    assert plan.known.all() and plan.labels.sum() == 0  # nothing checked: none of the findings
    plan, _ = labels_service.check(Request(findings=[], others="unspecified", n=1, steps=2))
    assert not plan.known.any()  # unconditional
    assert (settings.steps, settings.guidance, settings.seed) == (5, 1.5, 7)


def _r(**kw):
    return Request(**{"n": 1, "steps": 2, **kw})


@pytest.mark.parametrize(
    "request_, message",
    [
        (_r(findings=["Cardiomegaly"], n=5), "Number of images"),
        (_r(findings=["Cardiomegaly"], n=0), "Number of images"),
        (_r(findings=["Cardiomegaly"], n=None), "Number of images is missing"),
        (_r(findings=["Cardiomegaly"], n=2.5), "whole number"),
        (_r(findings=["Cardiomegaly"], steps=11), "Steps"),
        (_r(findings=["Cardiomegaly"], steps=float("nan")), "Steps"),
        (_r(findings=["Cardiomegaly"], guidance=-1), "Guidance"),
        (_r(findings=["Cardiomegaly"], guidance=float("inf")), "Guidance"),
        (_r(findings=["Cardiomegaly"], guidance="lots"), "Guidance"),
        (_r(findings=["Cardiomegaly"], seed=-3), "Seed"),
        (_r(findings=["Cardiomegaly"], seed=2**40), "Seed"),
        (_r(findings=["Cardiomegaly"], scheduler="euler-ish"), "unknown scheduler"),
        (_r(findings=["Cardiomegaly", "Dragon scales"]), "unknown finding 'Dragon scales'"),
        (_r(findings=["Cardiomegaly"], others="maybe"), "absent or unspecified"),
        (_r(prompt="chest x-ray with cardiomegaly"), "not text-conditioned"),
    ],
)
def test_bad_requests_are_refused_with_a_message(labels_service, request_, message):
    with pytest.raises(RequestError, match=message):
        labels_service.check(request_)


def test_text_model_needs_a_bounded_prompt(text_service):
    assert text_service.takes_prompts and text_service.needs_prompt
    with pytest.raises(RequestError, match="type a prompt.*or pick findings"):
        text_service.check(Request(prompt="   ", n=1, steps=2))
    with pytest.raises(RequestError, match="Prompt is 41 characters long; the limit is 40"):
        text_service.check(Request(prompt="x" * 41, n=1, steps=2))
    with pytest.raises(RequestError, match="Negative prompt"):
        text_service.check(Request(prompt="chest x-ray", negative_prompt="y" * 41, n=1, steps=2))
    with pytest.raises(RequestError, match="not both"):
        text_service.check(Request(prompt="chest x-ray", findings=["Cardiomegaly"], n=1, steps=2))
    plan, settings = text_service.check(
        Request(prompt=" chest x-ray with edema ", negative_prompt="noise", n=2, steps=2)
    )
    assert plan.prompts == ["chest x-ray with edema"] * 2 and settings.negative_prompt == "noise"


def test_text_model_writes_prompts_from_findings(text_service):
    result = text_service.generate(Request(findings=["Cardiomegaly", "Edema"], n=1, steps=2))
    with zipfile.ZipFile(result.zip_path) as zf:
        rows = list(csv.DictReader(io.StringIO(zf.read("manifest.csv").decode())))
    assert rows[0]["prompt"] == "chest x-ray with cardiomegaly and edema"


def test_generation_zip_has_the_images_and_their_manifest(labels_service):
    steps = []
    result = labels_service.generate(
        Request(findings=["Pleural Effusion"], n=3, steps=3, seed=5),
        on_step=lambda done, total: steps.append((done, total)),
    )
    assert result.images.shape == (3, 32, 32) and float(result.images.std()) > 0.01
    assert steps[-1] == (3, 3) and [d for d, _ in steps] == [1, 2, 3]
    assert result.zip_path.parent == labels_service.work
    with zipfile.ZipFile(result.zip_path) as zf:
        names = set(zf.namelist())
        assert {"manifest.csv", "generation.json", "README.txt"} <= names
        assert {f"images/{i:07d}.png" for i in range(3)} <= names
        rows = list(csv.DictReader(io.StringIO(zf.read("manifest.csv").decode())))
        assert "not for diagnosis" in zf.read("README.txt").decode()
        from PIL import Image

        first = np.asarray(Image.open(io.BytesIO(zf.read("images/0000000.png"))), np.float32) / 255
    assert [r["Path"] for r in rows] == [f"images/{i:07d}.png" for i in range(3)]
    assert {r["Pleural Effusion"] for r in rows} == {"1.0"} and {r["Cardiomegaly"] for r in rows} == {"0.0"}
    assert {r["steps"] for r in rows} == {"3"}
    np.testing.assert_allclose(first, result.images[0], atol=1 / 255)
    assert "Pleural Effusion" in result.captions[0]


def test_prompts_never_become_paths_and_old_results_are_pruned(text_service, labels_service):
    before = set(labels_service.work.parent.iterdir())
    result = text_service.generate(Request(prompt="../../etc/passwd", n=1, steps=2))
    assert result.zip_path.parent == text_service.work and "passwd" not in result.zip_path.name
    assert set(labels_service.work.parent.iterdir()) == before  # nothing written beside the work folders
    for seed in range(3):  # keep_results=2
        labels_service.generate(Request(findings=["Edema"], n=1, steps=1, seed=seed))
    assert len(list(labels_service.work.glob("*.zip"))) == 2
    assert len([p for p in labels_service.work.iterdir() if p.is_dir()]) == 2


def test_same_seed_same_images(labels_service):
    a = labels_service.generate(Request(findings=["Edema"], n=2, steps=2, seed=11)).images
    b = labels_service.generate(Request(findings=["Edema"], n=2, steps=2, seed=11)).images
    c = labels_service.generate(Request(findings=["Edema"], n=2, steps=2, seed=12)).images
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_bad_limits_and_missing_model(tmp_path):
    with pytest.raises(MeddiffError, match="max_images. = 0 is below the minimum 1"):
        ServeLimits(max_images=0)
    with pytest.raises(MeddiffError, match="does not exist"):
        ModelService(tmp_path / "nope")


def test_serve_cli_fails_in_one_line_without_a_model(tmp_path, capsys):
    from meddiff.cli import build_parser, main

    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("meddiff: error:") and "does not exist" in err and len(err.splitlines()) == 1
    args = build_parser().parse_args(["serve", "--model", "m"])
    assert args.host == "127.0.0.1"  # localhost unless told otherwise


def test_a_model_whose_privacy_audit_failed_is_served_only_with_the_override(tiny_run, tmp_path):
    import json

    audit = tiny_run / "privacy" / "audit.json"
    audit.parent.mkdir(exist_ok=True)
    failed = {
        "verdict": "fail",
        "copies": 9,
        "n": 10,
        "copy_rate": 0.9,
        "copy_rate_interval": [0.6, 0.98],
        "alpha": 0.01,
    }
    audit.write_text(json.dumps(failed))
    try:
        with pytest.raises(MeddiffError, match="privacy audit failed.*not served without --allow-failed-audit"):
            ModelService(tiny_run, ServeLimits(max_images=2, max_steps=4))
        service = ModelService(
            tiny_run, ServeLimits(max_images=2, max_steps=4), work_dir=tmp_path, allow_failed_audit=True
        )
        result = service.generate(Request(findings=["Edema"], n=1, steps=2, seed=1))
        from PIL import Image

        with zipfile.ZipFile(result.zip_path) as zf:
            stamped = Image.open(io.BytesIO(zf.read("images/0000000.png"))).text["privacy"]
        assert stamped.startswith("PRIVACY AUDIT FAILED: its privacy audit failed: 9 of 10 samples")
        service.close()
    finally:
        audit.unlink()


def test_a_text_models_null_inputs_are_the_negative_or_empty_prompt(text_run):
    """Guidance contrasts against the negative prompt (the empty one by default): at guidance 0 a text model draws
    what the negative prompt alone gives."""
    import numpy as np
    import torch

    from meddiff.models.pipeline import encode_prompt
    from meddiff.models.storage import load_pipeline

    pipe = load_pipeline(text_run)
    empty, negative = pipe.null_inputs(2), pipe.null_inputs(2, ["noise", "noise"])
    assert empty["class_labels"] is None
    expected = encode_prompt(pipe.tokenizer, pipe.text_encoder, ["", ""], pipe.device)
    torch.testing.assert_close(empty["encoder_hidden_states"], expected)
    assert not torch.allclose(negative["encoder_hidden_states"], expected)

    def draw(**kwargs):
        g = torch.Generator().manual_seed(0)
        return pipe(num_inference_steps=2, generator=g, **kwargs).images

    only_negative = draw(prompt=["chest x-ray with edema"], negative_prompt="noise", guidance_scale=0.0)
    assert np.allclose(only_negative, draw(prompt=["noise"], guidance_scale=1.0), atol=1e-5)
