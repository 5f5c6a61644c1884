"""spec.image: "" is a templated value that came out empty, refused at apply naming the field (issue 22)."""

import pytest
from pydantic import ValidationError

from finetune_operator.api import FineTuneJob
from finetune_operator.crd import build_crd

from .conftest import job_body


def test_an_empty_image_is_refused_naming_spec_image():
    with pytest.raises(ValidationError, match=r"spec\.image"):
        FineTuneJob.model_validate(job_body(image=""))
    assert FineTuneJob.model_validate(job_body()).spec.image is None


def test_the_api_server_refuses_it_too():
    spec = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["properties"]["image"]["minLength"] == 1
