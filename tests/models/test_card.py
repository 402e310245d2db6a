"""The one model-card writer: a Hugging Face card whose metadata parses, with the shared intended-use section."""

from huggingface_hub import ModelCard

from meddiff.models.card import BASE_TAGS, DISCLAIMER, CardContent, CardSection, write_card


def _content(**kw):
    return CardContent(
        title="meddiff model: phantom:DIR",
        summary=["- a one-line summary"],
        sections=[CardSection(title="Data", lines=["- 60 phantoms"])],
        **kw,
    )


def test_card_metadata_parses_with_huggingface_hub(tmp_path):
    path = write_card(
        _content(
            tags=["diffusion", "medical-imaging"],
            pipeline_tag="text-to-image",
            base_model="org/base",
            datasets=["org/data"],
            trained_on="60 phantoms",
        ),
        tmp_path,
    )
    assert path == tmp_path / "README.md"
    card = ModelCard.load(path)
    data = card.data.to_dict()
    assert data["library_name"] == "diffusers" and data["license"] == "other"
    assert data["tags"][: len(BASE_TAGS)] == list(BASE_TAGS) and data["tags"].count("medical-imaging") == 1
    assert "diffusion" in data["tags"]
    assert data["base_model"] == "org/base" and data["datasets"] == ["org/data"]
    assert data["pipeline_tag"] == "text-to-image"
    text = card.text
    assert text.index("# meddiff model: phantom:DIR") < text.index(DISCLAIMER) < text.index("## Data")
    assert "- a one-line summary" in text and "- 60 phantoms" in text


def test_every_card_ends_with_the_shared_intended_use_section(tmp_path):
    card = ModelCard.load(write_card(_content(trained_on="60 phantoms"), tmp_path))
    use = card.text.split("## Intended use", 1)[1]
    assert card.text.rstrip().endswith(use.rstrip()) and "## " not in use  # the last section
    assert "Research only" in use and "not for diagnosis" in use and "synthetic" in use
    assert "(60 phantoms)" in use and "base model" not in use
    data = card.data.to_dict()
    assert "base_model" not in data and "datasets" not in data and "pipeline_tag" not in data


def test_fine_tune_cards_name_the_base_model_license(tmp_path):
    card = ModelCard.load(write_card(_content(base_model="org/sd"), tmp_path))
    assert "the terms of the training data and of the base model apply" in card.text
