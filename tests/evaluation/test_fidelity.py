import numpy as np

from meddiff.data.spec import load_dataset
from meddiff.evaluation.classifier import per_label_auc, predict, train_classifier


def test_classifier_recognises_phantom_findings():
    train = load_dataset("phantom:?n=600&seed=21", 32)
    valid = load_dataset("phantom:?n=600&seed=21&split=valid", 32)
    model = train_classifier(train, epochs=6, seed=0)
    auc = per_label_auc(predict(model, valid.images), valid.labels.numpy(), valid.known.numpy(), valid.label_names)
    assert auc["Cardiomegaly"] > 0.9 and auc["Pleural Effusion"] > 0.85, auc


def test_auc_is_none_for_a_single_class():
    probs = np.array([[0.1], [0.9]])
    assert per_label_auc(probs, np.array([[1.0], [1.0]]), np.ones((2, 1), bool), ["A"]) == {"A": None}
    assert per_label_auc(probs, np.array([[0.0], [1.0]]), np.ones((2, 1), bool), ["A"]) == {"A": 1.0}
