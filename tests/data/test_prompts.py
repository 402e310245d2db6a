from meddiff.data.prompts import PromptOptions, prompt_for, prompt_from_labels, shuffle_findings

NAMES = ["No Finding", "Cardiomegaly", "Pleural Effusion", "Edema"]


def test_findings_join_naturally():
    assert prompt_from_labels(["Cardiomegaly"]) == "chest x-ray with cardiomegaly"
    assert (
        prompt_from_labels(["Cardiomegaly", "Pleural Effusion"]) == "chest x-ray with cardiomegaly and pleural effusion"
    )
    assert (
        prompt_from_labels(["Cardiomegaly", "Edema", "Pleural Effusion"])
        == "chest x-ray with cardiomegaly, edema and pleural effusion"
    )


def test_no_finding_is_a_normal_study():
    assert prompt_from_labels(["No Finding"]) == "normal chest x-ray"
    assert prompt_for({"No Finding": 1.0}, NAMES, PromptOptions()) == "normal chest x-ray"
    assert prompt_from_labels([]) == "chest x-ray"


def test_uncertain_omitted_or_possible_and_view_demographics():
    values = {"Cardiomegaly": 1.0, "Edema": -1.0, "Pleural Effusion": 0.0}
    assert prompt_for(values, NAMES, PromptOptions()) == "chest x-ray with cardiomegaly"
    assert (
        prompt_for(values, NAMES, PromptOptions(uncertain="possible"))
        == "chest x-ray with cardiomegaly, possible edema"
    )
    full = prompt_for(values, NAMES, PromptOptions(view=True, demographics=True), view="PA", sex="Female", age=64.0)
    assert full == "PA chest x-ray of a 64-year-old woman, with cardiomegaly"
    assert prompt_for({"Edema": -1.0}, NAMES, PromptOptions(uncertain="possible")) == "chest x-ray with possible edema"


NAMES = ["No Finding", "Cardiomegaly", "Pleural Effusion", "Edema"]


def test_shuffle_findings_reorders_only_the_findings():
    prompt = prompt_from_labels(["Cardiomegaly", "Pleural Effusion", "Edema"])
    assert (
        shuffle_findings(prompt, NAMES, [0, 0.9, 0.1, 0.5])
        == "chest x-ray with pleural effusion, edema and cardiomegaly"
    )
    assert shuffle_findings(prompt, NAMES, [0, 0.1, 0.2, 0.3]) == prompt
    # demographics and possible findings keep their place; only the definite findings move
    long = prompt_from_labels(["Cardiomegaly", "Edema"], uncertain=["Pleural Effusion"], sex="F", age=64)
    assert (
        shuffle_findings(long, NAMES, [0, 0.9, 0.5, 0.1])
        == "chest x-ray of a 64-year-old woman, with edema and cardiomegaly, possible pleural effusion"
    )
    # one finding, a normal study and free text are left alone
    for text in (
        prompt_from_labels(["Edema"]),
        prompt_from_labels(["No Finding"]),
        "chest x-ray with large effusion and mild cardiomegaly",
    ):
        assert shuffle_findings(text, NAMES, [0.9, 0.5, 0.1, 0.0]) == text


def test_training_sees_both_orders_only_when_asked():
    import torch

    from meddiff.data.dataset import ImageLabelDataset

    labels = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 1]], dtype=torch.float32)
    data = ImageLabelDataset(torch.zeros(2, 1, 8, 8), labels, torch.ones(2, 4, dtype=torch.bool), NAMES)
    assert data.prompts_from_labels
    g = torch.Generator().manual_seed(0)
    seen = {data.shuffled_prompt(0, g) for _ in range(50)}
    assert seen == {
        "chest x-ray with cardiomegaly and pleural effusion",
        "chest x-ray with pleural effusion and cardiomegaly",
    }
    assert {data.shuffled_prompt(1, g) for _ in range(5)} == {"chest x-ray with edema"}
    free = ImageLabelDataset(
        torch.zeros(2, 1, 8, 8),
        labels,
        torch.ones(2, 4, dtype=torch.bool),
        NAMES,
        prompts=["cardiomegaly and pleural effusion", "edema"],
    )
    assert not free.prompts_from_labels and free.shuffled_prompt(0, g) == "cardiomegaly and pleural effusion"
