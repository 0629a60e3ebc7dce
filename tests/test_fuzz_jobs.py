"""Property test of job creation: any form data gets a response below 500, and a rejection writes
no row and no file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies as st

from editing.models import EditJob, Template
from tests.conftest import png_bytes

pytestmark = pytest.mark.django_db

SIZE = 64
VALID_MASK = png_bytes(np.full((SIZE, SIZE), 255, dtype=np.uint8))

# Text that reaches the parsers: numbers in many spellings, control and non-ASCII characters.
texts = st.one_of(
    st.text(max_size=60),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["", " ", "0", "1", "-1", "1e309", "０", "١٢", "0x10", "None", "null", "../../etc/passwd"]),
)
masks = st.one_of(
    st.just(VALID_MASK),
    st.binary(max_size=200),
    st.builds(lambda cut: VALID_MASK[:cut], st.integers(min_value=0, max_value=len(VALID_MASK))),
    st.builds(
        lambda w, h, value: png_bytes(np.full((h, w), value, dtype=np.uint8)),
        st.integers(min_value=1, max_value=48), st.integers(min_value=1, max_value=48), st.sampled_from([0, 127, 255]),
    ),
)
# Each required field is valid about half the time, so that valid submissions are reached too.
fields = st.fixed_dictionaries(
    {
        "template": st.one_of(st.just("OWN"), st.just("OWN"), st.just("OTHER"), texts),
        "mask": st.one_of(st.just(VALID_MASK), st.just(VALID_MASK), masks),
        "prompt": st.one_of(st.just("a red cup"), st.just("a red cup"), texts, st.text(min_size=1990, max_size=2100)),
    },
    optional={
        "seed": st.one_of(st.integers(min_value=0, max_value=2**32 - 1).map(str), texts),
        "steps": st.one_of(st.integers(min_value=1, max_value=100).map(str), texts),
        "guidance": st.one_of(st.floats(min_value=0, max_value=100).map(str), texts),
    },
)


@pytest.fixture
def setup(api_client_for, settings, tmp_path: Path):
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.EDITOR_WARMUP_ON_CREATE = False
    settings.EDITOR_JOB_SUBMIT_RATE = None
    alice = api_client_for("alice")
    bob = api_client_for("bob")
    image = png_bytes(np.random.default_rng(1).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    own = alice.post("/api/templates/", {"image": SimpleUploadedFile("a.png", image)}, format="multipart").json()
    other = bob.post("/api/templates/", {"image": SimpleUploadedFile("b.png", image)}, format="multipart").json()
    return alice, {"OWN": own["id"], "OTHER": other["id"]}, settings.MEDIA_ROOT


def stored_files(media: Path) -> set[Path]:
    return {path for path in media.rglob("*") if path.is_file()}


def test_job_creation_never_500s(setup):
    # The test runs inside a transaction that is rolled back, so no message is ever sent to a broker.
    alice, template_ids, media = setup
    outcomes: list[int] = []

    @hypothesis_settings(
        max_examples=200, deadline=None, derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(data=fields)
    def check(data: dict) -> None:
        payload = dict(data)
        if payload.get("template") in template_ids:
            payload["template"] = template_ids[payload["template"]]
        if "mask" in payload:
            payload["mask"] = SimpleUploadedFile("m.png", payload["mask"])
        jobs_before = EditJob.objects.count()
        files_before = stored_files(media)

        response = alice.post("/api/jobs/", payload, format="multipart")
        outcomes.append(response.status_code)

        assert response.status_code < 500, (data, response.content)
        if 400 <= response.status_code < 500:
            assert EditJob.objects.count() == jobs_before
            assert stored_files(media) == files_before
            assert set(response.json()) <= {"template", "mask", "prompt", "seed", "steps", "guidance"}
        else:
            assert response.status_code == 201
            assert EditJob.objects.count() == jobs_before + 1

    check()
    # Both branches ran: the strategies reach valid submissions as well as rejections.
    assert 201 in outcomes
    assert 400 in outcomes
    assert Template.objects.count() == 2
