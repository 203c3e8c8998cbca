"""The web page's files under ``/ui/static/``: each one the page names is
served, open without a key, under the page's policy; nothing else is; the
vendored libraries are the versions package.json pins."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .conftest import gateway_for

ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "rest_gateway" / "static"
UNREACHABLE_CORE = "127.0.0.1:1"  # the page's files need no core


def page_assets(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="(ui/static/[^"]+)"', html)


async def test_the_page_and_every_file_it_names_are_served_without_a_key():
    async with gateway_for(grpc_address=UNREACHABLE_CORE, api_key="k") as http:
        page = await http.get("/ui")
        names = page_assets(page.text)
        assets = {name: await http.get(f"/{name}") for name in names}
        api = await http.get("/sessions")
    assert page.status_code == 200 and api.status_code == 401  # the key guards the API only
    assert sorted(names) == [
        "ui/static/ui.css",
        "ui/static/ui.js",
        "ui/static/vendor/marked.umd.js",
        "ui/static/vendor/purify.min.js",
    ]
    # Nothing from another origin, and no inline script or style to allow.
    assert not re.search(r"""(?:src|href)=["']?(?:https?:)?//""", page.text)
    assert not re.search(r"<script>|<style|\sstyle=|\son\w+=", page.text)
    policy = page.headers["content-security-policy"]
    assert "script-src 'self';" in policy and "style-src 'self';" in policy
    assert "unsafe-inline" not in policy
    for name, reply in assets.items():
        assert reply.status_code == 200, name
        assert reply.content == (STATIC / name.removeprefix("ui/static/")).read_bytes()
        kind = "text/css" if name.endswith(".css") else "text/javascript"
        assert reply.headers["content-type"].startswith(kind)
        assert reply.headers["x-content-type-options"] == "nosniff"
        assert reply.headers["content-security-policy"] == policy


async def test_only_the_listed_files_are_served_and_unchanged_ones_are_not_sent_again():
    async with gateway_for(grpc_address=UNREACHABLE_CORE) as http:
        first = await http.get("/ui/static/ui.js")
        again = await http.get("/ui/static/ui.js", headers={"If-None-Match": first.headers["etag"]})
        others = [
            await http.get(f"/ui/static/{name}")
            for name in ("ui.html", "vendor/marked.LICENSE", "../ui.py", "%2e%2e/ui.py", "nope.js")
        ]
    assert first.status_code == 200 and first.headers["cache-control"] == "no-cache"
    assert again.status_code == 304 and again.content == b""
    assert [other.status_code for other in others] == [404] * len(others)


def test_the_vendored_libraries_are_the_pinned_versions_with_their_licenses():
    pins = json.loads((ROOT / "package.json").read_text())["devDependencies"]
    marked = (STATIC / "vendor" / "marked.umd.js").read_text()
    purify = (STATIC / "vendor" / "purify.min.js").read_text()
    assert marked.startswith(f"/**\n * marked v{pins['marked']} - a markdown parser")
    assert "(MIT License)" in marked[:300]
    assert purify.startswith(f"/*! @license DOMPurify {pins['dompurify']} |")
    assert "sourceMappingURL" not in marked + purify  # the maps are not shipped
    assert (STATIC / "vendor" / "marked.LICENSE").read_text().startswith("# License")
    assert "Apache License" in (STATIC / "vendor" / "dompurify.LICENSE").read_text()
