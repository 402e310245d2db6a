from meddiff.data.prompts import PromptOptions, prompt_for, prompt_from_labels

NAMES = ["No Finding", "Cardiomegaly", "Pleural Effusion", "Edema"]


def test_findings_join_naturally():
    assert prompt_from_labels(["Cardiomegaly"]) == "chest x-ray with cardiomegaly"
    assert prompt_from_labels(["Cardiomegaly", "Pleural Effusion"]) == "chest x-ray with cardiomegaly and pleural effusion"
    assert prompt_from_labels(["Cardiomegaly", "Edema", "Pleural Effusion"]) == \
        "chest x-ray with cardiomegaly, edema and pleural effusion"


def test_no_finding_is_a_normal_study():
    assert prompt_from_labels(["No Finding"]) == "normal chest x-ray"
    assert prompt_for({"No Finding": 1.0}, NAMES, PromptOptions()) == "normal chest x-ray"
    assert prompt_from_labels([]) == "chest x-ray"


def test_uncertain_omitted_or_possible_and_view_demographics():
    values = {"Cardiomegaly": 1.0, "Edema": -1.0, "Pleural Effusion": 0.0}
    assert prompt_for(values, NAMES, PromptOptions()) == "chest x-ray with cardiomegaly"
    assert prompt_for(values, NAMES, PromptOptions(uncertain="possible")) == \
        "chest x-ray with cardiomegaly, possible edema"
    full = prompt_for(values, NAMES, PromptOptions(view=True, demographics=True), view="PA", sex="Female", age=64.0)
    assert full == "PA chest x-ray of a 64-year-old woman, with cardiomegaly"
    assert prompt_for({"Edema": -1.0}, NAMES, PromptOptions(uncertain="possible")) == "chest x-ray with possible edema"
