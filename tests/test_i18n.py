"""Japanese catalogue: complete, compiled, and used for pages and API errors."""

from __future__ import annotations

import ast
import gettext
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.utils import translation

from tests.conftest import ROOT, png_bytes

PO_PATH = ROOT / "locale" / "ja" / "LC_MESSAGES" / "django.po"
MO_PATH = PO_PATH.with_suffix(".mo")
PLACEHOLDER = re.compile(r"%\(\w+\)[-+ #0]*\d*(?:\.\d+)?[sdifr]|%%")
JAPANESE = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")


@dataclass
class PoEntry:
    msgid: str
    msgid_plural: str | None
    msgstrs: list[str]
    fuzzy: bool
    context: str | None = None


def parse_po(text: str) -> list[PoEntry]:
    """Read the entries of a .po file (header included); enough of the format for Django catalogues."""
    entries: list[PoEntry] = []
    for block in re.split(r"\n\s*\n", text.strip()):
        fields: dict[str, str] = {}
        current = None
        fuzzy = False
        for line in block.splitlines():
            if line.startswith("#,") and "fuzzy" in line:
                fuzzy = True
            if line.startswith("#"):
                continue
            match = re.match(r'^(msgctxt|msgid_plural|msgid|msgstr(?:\[\d+\])?)\s+(".*")$', line)
            if match:
                current = match.group(1)
                fields[current] = ast.literal_eval(match.group(2))
            elif line.startswith('"') and current:
                fields[current] += ast.literal_eval(line)
        if "msgid" not in fields:
            continue
        msgstrs = [value for key, value in sorted(fields.items()) if key.startswith("msgstr")]
        entries.append(PoEntry(fields["msgid"], fields.get("msgid_plural"), msgstrs, fuzzy, fields.get("msgctxt")))
    return entries


@pytest.fixture(scope="module")
def po_entries() -> list[PoEntry]:
    return [entry for entry in parse_po(PO_PATH.read_text(encoding="utf-8")) if entry.msgid]


def test_po_has_no_untranslated_entries(po_entries):
    untranslated = [entry.msgid for entry in po_entries if not all(entry.msgstrs)]
    assert untranslated == []


def test_po_has_no_fuzzy_entries(po_entries):
    assert [entry.msgid for entry in po_entries if entry.fuzzy] == []


def test_po_header_declares_japanese():
    header = parse_po(PO_PATH.read_text(encoding="utf-8"))[0]
    assert header.msgid == ""
    assert not header.fuzzy
    assert "Language: ja\n" in header.msgstrs[0]
    assert "charset=UTF-8" in header.msgstrs[0]


def test_translations_keep_placeholders(po_entries):
    for entry in po_entries:
        expected = sorted(PLACEHOLDER.findall(entry.msgid))
        for msgstr in entry.msgstrs:
            assert sorted(PLACEHOLDER.findall(msgstr)) == expected, entry.msgid


def test_mo_matches_po(po_entries):
    """The committed .mo is compiled from the current .po, so every msgid translates at run time."""
    with MO_PATH.open("rb") as handle:
        catalog = gettext.GNUTranslations(handle)
    for entry in po_entries:
        if entry.context is not None:
            assert catalog.pgettext(entry.context, entry.msgid) == entry.msgstrs[0], entry.msgid
        elif entry.msgid_plural is None:
            assert catalog.gettext(entry.msgid) == entry.msgstrs[0], entry.msgid
        else:
            assert catalog.ngettext(entry.msgid, entry.msgid_plural, 2) == entry.msgstrs[0], entry.msgid


@pytest.mark.skipif(shutil.which("xgettext") is None, reason="GNU gettext (xgettext) is not installed")
def test_po_covers_every_msgid_in_source(po_entries, tmp_path):
    """Extract msgids from editing/ and editor_site/ afresh; each must be in the committed .po."""
    for package in ("editing", "editor_site"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "static"))
    (tmp_path / "locale").mkdir()
    env = {key: value for key, value in os.environ.items() if key != "DJANGO_SETTINGS_MODULE"}
    subprocess.run(
        [sys.executable, "-m", "django", "makemessages", "-l", "ja", "--no-location"],
        cwd=tmp_path, env=env, check=True, capture_output=True,
    )
    extracted = parse_po((tmp_path / "locale" / "ja" / "LC_MESSAGES" / "django.po").read_text(encoding="utf-8"))
    committed = {entry.msgid for entry in po_entries}
    missing = sorted(entry.msgid for entry in extracted if entry.msgid and entry.msgid not in committed)
    assert missing == [], "run `manage.py makemessages -l ja` and translate the new entries"


@pytest.fixture
def alice_client(django_user_model) -> Client:
    client = Client(headers={"accept-language": "ja"})
    client.force_login(django_user_model.objects.create_user(username="alice", password="pw-alice"))
    return client


@pytest.mark.django_db
def test_login_page_in_japanese():
    html = Client(headers={"accept-language": "ja"}).get("/accounts/login/").content.decode()
    assert '<html lang="ja">' in html
    assert "ログイン" in html
    assert "ユーザー名" in html


@pytest.mark.django_db
@pytest.mark.parametrize(("path", "phrase"), [("/", "プロンプト"), ("/history/", "編集はまだありません。")])
def test_pages_in_japanese(alice_client, path, phrase):
    html = alice_client.get(path).content.decode()
    assert '<html lang="ja">' in html
    assert phrase in html


@pytest.mark.django_db
def test_editor_script_messages_in_japanese(alice_client):
    html = alice_client.get("/").content.decode()
    match = re.search(r'<script id="editor-messages" type="application/json">(.*?)</script>', html, re.S)
    messages = json.loads(match.group(1))
    english = {
        key: text for key, text in messages.items()
        if set(re.findall(r"[A-Za-z]{2,}", PLACEHOLDER.sub("", text))) - {"px", "HTTP", "FLOPs"}
    }
    assert english == {}
    assert messages["status_succeeded"] == "完了"


@pytest.mark.django_db
def test_english_without_accept_language(alice_client):
    html = Client().get("/accounts/login/").content.decode()
    assert '<html lang="en">' in html
    assert "User name" in html


@pytest.mark.django_db
def test_api_range_error_in_japanese(alice_client, media_root, settings):
    settings.EDITOR_WARMUP_ON_CREATE = False
    template = alice_client.post(
        "/api/templates/", {"image": SimpleUploadedFile("coffee.png", (ROOT / "demo/photos/coffee.png").read_bytes())}
    ).json()
    response = alice_client.post(
        "/api/jobs/",
        {"template": template["id"], "mask": SimpleUploadedFile("mask.png", b""), "prompt": "カップ", "steps": "1000"},
    )
    assert response.status_code == 400
    assert response.json()["steps"] == ["ステップ数（steps）は 1 から 100 の範囲で指定してください。受け取った値: 1000"]


@pytest.mark.django_db
def test_api_image_error_in_japanese(alice_client, media_root):
    response = alice_client.post("/api/templates/", {"image": SimpleUploadedFile("notes.txt", b"plain text")})
    message = response.json()["image"][0]
    assert response.status_code == 400
    assert JAPANESE.search(message), message


@pytest.mark.django_db
def test_api_not_found_in_japanese(alice_client):
    response = alice_client.get("/api/jobs/not-a-uuid/")
    assert response.status_code == 404
    assert response.json() == {
        "detail": "ジョブ not-a-uuid は見つかりません（または別のユーザーのものです）。自分のジョブは GET /api/jobs/ で一覧できます。"
    }


def test_translation_active_for_ja():
    with translation.override("ja"):
        assert translation.gettext("Mask editor") == "マスク編集"


@pytest.mark.django_db
def test_api_size_error_uses_multiplication_sign(alice_client, media_root):
    tiny = SimpleUploadedFile("tiny.png", png_bytes(np.zeros((8, 8, 3), dtype=np.uint8)))
    response = alice_client.post("/api/templates/", {"image": tiny})
    message = response.json()["image"][0]
    assert response.status_code == 400
    assert "8×8 ピクセル" in message
    assert "8x8" not in message


def test_japanese_labels_use_full_width_parentheses():
    from editing.pages import cache_labels

    with translation.override("ja"):
        assert cache_labels()["flop_fraction"] == "計算量（FLOPs）"
        assert translation.gettext("Brush size (px)") == "ブラシサイズ（px）"
        assert translation.gettext("Download result (PNG)") == "結果をダウンロード（PNG）"
