"""Template upload, listing, download and deletion through the API."""

from __future__ import annotations

import io

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from PIL import Image

from tests.conftest import PHOTOS, png_bytes
from tests.test_i18n import JAPANESE

pytestmark = pytest.mark.django_db


def upload(client, data: bytes, file_name: str = "photo.png", **fields):
    return client.post(
        "/api/templates/", {"image": SimpleUploadedFile(file_name, data), **fields}, format="multipart"
    )


def test_upload_coffee_photo(api_client_for, media_root):
    client = api_client_for("alice")
    response = upload(client, (PHOTOS / "coffee.png").read_bytes(), file_name="coffee.png")
    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["width"], body["height"]) == (600, 400)
    assert body["name"] == "coffee"
    assert len(body["content_hash"]) == 64


def test_upload_keeps_given_name(api_client_for, media_root):
    response = upload(api_client_for(), (PHOTOS / "chelsea.png").read_bytes(), file_name="x.png", name="Cat banner")
    assert response.status_code == 201
    assert response.json()["name"] == "Cat banner"


def test_download_returns_upright_png(api_client_for, media_root):
    client = api_client_for()
    created = upload(client, (PHOTOS / "rocket.jpg").read_bytes(), file_name="rocket.jpg").json()
    response = client.get(created["image_url"])
    assert response.status_code == 200
    image = Image.open(io.BytesIO(b"".join(response.streaming_content)))
    assert image.size == (640, 427)
    assert image.mode == "RGB"


@pytest.mark.parametrize("data", [b"", b"this is not an image"], ids=["zero-byte", "text"])
def test_rejects_non_images_with_400(api_client_for, media_root, data):
    response = upload(api_client_for(), data, file_name="bad.png")
    assert response.status_code == 400
    assert "image" in response.json()


def test_rejects_truncated_png(api_client_for, media_root):
    data = (PHOTOS / "coffee.png").read_bytes()
    response = upload(api_client_for(), data[: len(data) // 2])
    assert response.status_code == 400
    assert "image" in response.json()


def test_rejects_image_over_pixel_limit(api_client_for, media_root, settings):
    settings.EDITOR_MAX_PIXELS = 100 * 100
    response = upload(api_client_for(), png_bytes(np.zeros((101, 100, 3), dtype=np.uint8)))
    assert response.status_code == 400
    message = response.json()["image"][0]
    assert "10000" in message.replace(",", "")


def test_rejects_file_over_byte_limit(api_client_for, media_root, settings):
    settings.EDITOR_MAX_UPLOAD_BYTES = 2000
    response = upload(api_client_for(), (PHOTOS / "coffee.png").read_bytes())
    assert response.status_code == 400
    message = response.json()["image"][0]
    assert "over the limit of 0.0 MB (2000 bytes)" in message
    assert f"({len((PHOTOS / 'coffee.png').read_bytes())} bytes)" in message


def test_pixel_limit_message_suggests_size(api_client_for, media_root, settings):
    settings.EDITOR_MAX_PIXELS = 100 * 100
    response = upload(api_client_for(), png_bytes(np.zeros((150, 300, 3), dtype=np.uint8)))

    assert response.status_code == 400
    assert response.json()["image"] == [
        "The image is 300×150 = 45000 pixels, above the limit of 10000 pixels. Downscale it, for example to "
        "141×70, and upload it again."
    ]


def test_rejected_upload_writes_nothing(api_client_for, media_root):
    from editing.models import Template

    before = sorted(media_root.rglob("*"))
    upload(api_client_for(), b"garbage")
    assert Template.objects.count() == 0
    assert sorted(media_root.rglob("*")) == before


def test_other_user_cannot_see_or_download(api_client_for, media_root):
    alice = api_client_for("alice")
    bob = api_client_for("bob")
    created = upload(alice, (PHOTOS / "coffee.png").read_bytes()).json()
    assert bob.get("/api/templates/").json()["results"] == []
    assert bob.get(f"/api/templates/{created['id']}/").status_code == 404
    assert bob.get(created["image_url"]).status_code == 404
    assert bob.delete(f"/api/templates/{created['id']}/").status_code == 404
    assert alice.get(f"/api/templates/{created['id']}/").status_code == 200


def test_delete_template(api_client_for, media_root):
    client = api_client_for()
    created = upload(client, (PHOTOS / "coffee.png").read_bytes()).json()
    assert client.delete(f"/api/templates/{created['id']}/").status_code == 204
    assert client.get(f"/api/templates/{created['id']}/").status_code == 404


def test_anonymous_request_is_rejected(client):
    response = client.get("/api/templates/")
    japanese = client.get("/api/templates/", HTTP_ACCEPT_LANGUAGE="ja")

    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Token"
    assert "POST /api/token/" in response.json()["detail"]
    assert "Authorization: Token <token>" in response.json()["detail"]
    assert japanese.status_code == 401
    assert "POST /api/token/" in japanese.json()["detail"]
    assert JAPANESE.search(japanese.json()["detail"])


def test_token_endpoint_gives_working_token(client, django_user_model, media_root):
    from rest_framework.test import APIClient

    django_user_model.objects.create_user(username="carol", password="pw-carol-1")
    wrong = client.post("/api/token/", {"username": "carol", "password": "nope"}, HTTP_ACCEPT_LANGUAGE="ja")
    issued = client.post("/api/token/", {"username": "carol", "password": "pw-carol-1"})
    again = client.post("/api/token/", {"username": "carol", "password": "pw-carol-1"})
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {issued.json()['token']}")

    assert wrong.status_code == 400
    assert "non_field_errors" in wrong.json()
    assert issued.status_code == 200
    assert again.json()["token"] == issued.json()["token"]
    assert api.get("/api/templates/").status_code == 200


def test_openapi_schema_is_served(api_client_for):
    response = api_client_for().get("/api/schema/", HTTP_ACCEPT="application/json")
    assert response.status_code == 200
    schema = response.json()
    assert "/api/jobs/" in schema["paths"]
    components = schema["components"]["schemas"]
    # Upload fields are binary, so Swagger UI offers a file picker for them.
    assert components["TemplateCreateRequest"]["properties"]["image"]["format"] == "binary"
    assert components["JobCreateRequest"]["properties"]["mask"]["format"] == "binary"
    assert components["JobCreateRequest"]["properties"]["template"]["type"] == "integer"
    assert components["JobCreateRequest"]["properties"]["prompt"]["type"] == "string"


def test_token_endpoint_is_throttled(client, django_user_model):
    from django.core.cache import cache

    cache.clear()
    django_user_model.objects.create_user(username="dave", password="pw-dave-1")
    statuses = [client.post("/api/token/", {"username": "dave", "password": "wrong"}).status_code for _ in range(10)]
    english = client.post("/api/token/", {"username": "dave", "password": "wrong"})
    japanese = client.post("/api/token/", {"username": "dave", "password": "wrong"}, HTTP_ACCEPT_LANGUAGE="ja")
    cache.clear()

    assert statuses == [400] * 10
    assert english.status_code == 429
    assert english.json()["detail"].startswith("Too many sign-in attempts from this address; the limit is 10/min.")
    assert int(english["Retry-After"]) > 0
    assert japanese.status_code == 429
    assert "10/min" in japanese.json()["detail"]
    assert "Expected" not in japanese.json()["detail"]
    assert JAPANESE.search(japanese.json()["detail"])


def test_drop_covers_templates_sharing_content(api_client_for, media_root, settings):
    from editing.models import CacheWarmup, JobStatus, Template

    settings.EDITOR_WARMUP_ON_CREATE = False
    alice = api_client_for("alice")
    png = (PHOTOS / "coffee.png").read_bytes()
    first = upload(alice, png).json()
    again = upload(alice, png, name="coffee again").json()
    other = upload(alice, (PHOTOS / "chelsea.png").read_bytes()).json()
    assert first["content_hash"] == again["content_hash"]
    for template_id, key in ((first["id"], "shared"), (again["id"], "shared"), (other["id"], "other")):
        CacheWarmup.objects.create(
            template=Template.objects.get(pk=template_id), seed=0, steps=20, guidance=30.0, variant="kv",
            status=JobStatus.SUCCEEDED, cache_key=key, cache_bytes=1024, cache_tier="memory",
        )
    assert alice.get(f"/api/templates/{first['id']}/").json()["cache"]["dropped_at"] is None

    response = alice.delete(f"/api/templates/{first['id']}/cache/")

    assert response.status_code == 200
    assert response.json() == {"dropped": 2}
    assert alice.get(f"/api/templates/{first['id']}/").json()["cache"]["dropped_at"] is not None
    assert alice.get(f"/api/templates/{again['id']}/").json()["cache"]["dropped_at"] is not None
    assert alice.get(f"/api/templates/{other['id']}/").json()["cache"]["dropped_at"] is None


def test_json_upload_names_multipart(api_client_for):
    response = api_client_for("alice").post("/api/templates/", {"name": "x"}, format="json")

    assert response.status_code == 415
    assert response.json()["detail"] == (
        "Content type application/json is not accepted here; send one of multipart/form-data, "
        "application/x-www-form-urlencoded. Files such as image go in a multipart/form-data body "
        "(curl -F image=@photo.png)."
    )
