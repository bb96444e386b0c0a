import pytest

from clusiam.errors import ConfigError
from clusiam.metrics import positive_class


def test_the_positive_class_is_the_one_named_else_tumor_when_present():
    assert positive_class(["normal", "tumor"], None) == "tumor"
    assert positive_class(["normal", "tumor"], "normal") == "normal"
    assert positive_class(["adipose", "stroma", "tumour"], None) is None  # no "tumor": no binary score
    with pytest.raises(ConfigError, match="--positive 'Tumor' is not one of the classes normal, tumor"):
        positive_class(["normal", "tumor"], "Tumor")
