"""The examples run with one command on bundled data and the loss falls."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))


def test_cnn_digits_example_learns():
    import cnn_digits

    hist = cnn_digits.main(["--epochs", "2"])
    assert hist["loss"][1] < hist["loss"][0] < 2.31  # ln(10) = 2.303 is chance level
    assert hist["test_acc"][-1] > 0.6  # chance is 0.1
